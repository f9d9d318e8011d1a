"""Dataset readers in the layouts the field uses."""

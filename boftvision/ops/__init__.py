"""Pure tensor functions for the adapter math (no nn.Module state)."""

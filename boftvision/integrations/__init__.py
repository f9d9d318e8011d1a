"""Model families: target presets and what each family needs beyond the core."""

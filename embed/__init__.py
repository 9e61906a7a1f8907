"""kiln embed package."""

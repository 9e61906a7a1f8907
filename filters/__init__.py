"""kiln filters package."""

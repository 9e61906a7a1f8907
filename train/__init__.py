"""kiln train package."""

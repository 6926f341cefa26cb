"""Finding, loading and describing models."""

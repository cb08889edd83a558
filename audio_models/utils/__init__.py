"""Small shared helpers: errors, provenance, hashing."""

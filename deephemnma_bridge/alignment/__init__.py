"""Forward model (projection of a deformed, rotated, shifted reference), CTF, and HEMNMA."""

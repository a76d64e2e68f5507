"""Data shipped inside the package (the bundled adenylate kinase model)."""

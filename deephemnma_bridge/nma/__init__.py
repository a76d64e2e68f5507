"""Normal modes of elastic network models (ANM and RTB)."""

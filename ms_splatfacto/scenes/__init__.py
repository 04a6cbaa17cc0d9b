"""Procedural scenes the project generates itself (real captures cannot ship in the repository)."""

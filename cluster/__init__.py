"""Configuration, Ray launching and the `halfmoon` CLI: the package that wires the others."""

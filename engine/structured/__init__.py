"""Constrained decoding: what a request's output must be (`Constraint`), compiled and matched
by llguidance (`backend`, `matcher`). See `engine.structured.constraint` for the kinds."""
from engine.structured.constraint import KINDS, Constraint

__all__ = ["KINDS", "Constraint"]

"""Helpers shared by the tests: builders of small runs, studies and subprocess entry points."""

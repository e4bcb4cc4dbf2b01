"""Plot functions for the papers' figures (tidy CSV in, PDF + PNG out) and the papers'
reported numbers (`figures.paper`)."""

"""Studies (grids of runs from one recipe) and their reports."""

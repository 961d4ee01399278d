"""Placement: which role runs on which GPU (a pure planner and the one module that creates Ray
placement groups). Arrives with the Ray data-plane issue."""

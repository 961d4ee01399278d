"""Placement: which role runs on which GPU. ``spec`` (request, roles, cluster resources),
``planner`` (pure: request + resources -> placement-group bundles, or a PlacementError before
anything starts) and ``groups`` (the only module that creates Ray placement groups)."""

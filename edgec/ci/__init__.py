"""CI artifacts per device: ``edgec ci build|diff|workflow|report`` (see README, "CI")."""

"""``edgec search``: one Optuna study over the recipes, their declared spaces (:mod:`edgec.space`)
and the target's backends, measured on the device and picked inside the accuracy budget
(:mod:`edgec.search.study`, :mod:`edgec.search.pick`, :mod:`edgec.search.report`)."""

"""Evaluation of influence estimates: the leaderboard's scoring and tables
(:mod:`.leaderboard`), the benchmarks' stage timings (:mod:`.benchmarks`), readers of the
figure scripts' stored runs (:mod:`.stored_runs`) and the long fit's record
(:mod:`.fit_record`). Leave-one-out and the LDS themselves are :mod:`influence.refit_validation`."""

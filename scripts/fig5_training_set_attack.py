#!/usr/bin/env python
"""Fig 5: training-set attacks that flip test predictions with visually indistinguishable changes.

Model: the dog-vs-fish Inception model of Fig 4 (logistic regression, weight decay 0.001,
on 2048-d Inception v3 features; only the top layer is theta), end to end from pixels.
For each target the attack of influence.applications.attack perturbs 1, then (from the start
again) 2 training images: signed steps along d I_up,loss / d pixels through the whole
network, projected to stay within half an 8-bit level of the original image (so the
saved uint8 image is unchanged), re-computing the attacked images' features and
re-training the top model after each step, until the target's prediction flips, the
images reach a fixed point, or the iteration cap (paper: 100). Candidates: the training
images with the largest pixel gradient (see influence.applications.attack for the candidate pool).

Step: 0.1 of an 8-bit level per iteration (--step-levels). A step of 0.02 in [-1, 1] units
(2.6 levels) exceeds the +-0.5-level box, so every step lands on a corner of the box and
the signs oscillate: on the quick data that moved P(true label) of the least confident
target from 0.9932 to 0.9924 in 8 iterations, against 0.9791 with quarter-level steps.
The original code's steps are 0.02 level (--step-levels 0.02).
Targets (default): confidence-stratified. The correctly classified test images are ranked
by the log-odds of their true label and split into --deciles (default 10) groups; --per-decile
(default 10) of each are attacked (seeded). metrics.json gives each decile's flip rates with
1 and 2 images and its log-odds range, the rates over the stratified sample, and flip_rate_1 /
flip_rate_2: the flip rate over all correctly classified test images (the paper's 57% / 77%
are over its 591), estimated by weighting each decile's rate by its size. --targets N attacks
a plain random sample of N instead; --all every correctly classified image; --only-deciles
runs some deciles (e.g. 1 = the least confident) for a partial run.

Data: the original release's dataset_dog-fish_train-900_test-300.npz when the data
directory's dogfish/ folder holds it (inputs then in its units, u / 127.5 - 1, so half an
8-bit level is 1/255), else the stand-in (Imagenette tench vs English springer); metrics.json
says which (data_source).

Iterations: default 30 (the paper's 100 with --max-iter 100) so that 100 targets and the
sweep below fit in about 3 CPU hours (on 2 cores about 0.4-1.2 s per iteration with 1 image
and 1.4-4 s with 10: a backward and a forward pass through Inception per attacked image, CG for
s_test, a warm-started re-fit of the top layer).
--quick: 2 deciles x 2 targets, 10 iterations, no sweep, no least-confident extra (and the
small quick dataset of Fig 4).

Resuming: every finished attack (target, number of images) and each target's candidate
ranking are recorded in <out>/attacks.jsonl under a key of the data, the top model and the
attack's settings; a
later run with the same settings reuses them, so a killed run resumes, and partial runs
(--only-deciles 1,2,3 today, 4,5,6 tomorrow, then the whole default) add up (--fresh:
start over).

Whether one half-level change can flip a target depends on how far the target is from the
decision boundary, so metrics.json also gives the flip rates by the target's log-odds of
its true label before the attack, and for the --least-confident (default 10) correctly
classified test images, attacked in addition to the sample and reported apart (a figure
panel plots P(true label) after the attack against that log-odds).

One image, two tries: like the original code, --second-alone also attacks each target with
the second-ranked training image alone (off by default: a third attack per target); then
flip_rate_1 counts the first-ranked image only, flip_rate_1_second the second,
flip_rate_1_either either one.

More images: the original code also attacks the top 3, 5 and 10 candidates together (the
paper: 10 images flip all but 1 of 591 targets). --sweep-targets (default 5; --quick 0)
of the sampled targets (the first in the sample's random order) are attacked with
--sweep-counts (default 3,5,10) images as well; metrics.json gives the flip rate for each
count on that subset (with its 1- and 2-image rates beside them), and the last panel plots
it against the number of images.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from influence.experiment import run

NAME = "fig5_training_set_attack"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--deciles", type=int, default=None,
                        help="confidence strata of the correctly classified test images (default 10; --quick: 2)")
    parser.add_argument("--per-decile", type=int, default=None, help="targets drawn per stratum (default 10; "
                        "--quick: 2)")
    parser.add_argument("--only-deciles", default=None,
                        help="attack only these strata, 1-based from the least confident (e.g. '1' or '1,2'), "
                             "for a partial run")
    parser.add_argument("--targets", type=int, default=None,
                        help="attack a plain random sample of this many correctly classified test images instead "
                             "of the stratified one")
    parser.add_argument("--data-source", choices=("auto", "original", "stand-in"), default="auto",
                        help="dog-fish images: the original release's npz when present (auto), or force one")
    parser.add_argument("--all", action="store_true", help="attack every correctly classified test image")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="iteration cap (default 30 to fit 2 CPU hours; the paper's 100 with --max-iter 100; "
                             "--quick: 10)")
    parser.add_argument("--step-levels", type=float, default=0.1,
                        help="signed step in 8-bit levels (default 0.1; the box is +-0.5 level)")
    parser.add_argument("--n-train", type=int, default=None, help="training images per class (default 900; "
                        "--quick: 60)")
    parser.add_argument("--n-test", type=int, default=None, help="test images per class (default 300; --quick: 30)")
    parser.add_argument("--least-confident", type=int, default=None,
                        help="also attack this many of the least confident correctly classified test images, "
                             "reported apart (default 10; --quick: 0)")
    parser.add_argument("--sweep-targets", type=int, default=None,
                        help="attack this many of the sampled targets with --sweep-counts images too (default 5; "
                             "--quick: 0; 0 to skip)")
    parser.add_argument("--sweep-counts", default="3,5,10",
                        help="numbers of top-ranked training images attacked together on the sweep targets")
    parser.add_argument("--second-alone", action=argparse.BooleanOptionalAction, default=None,
                        help="also attack the second-ranked training image alone, as the original code does "
                             "([1st] and [2nd] tries; off by default to keep the default run under 3 CPU hours); "
                             "flip_rate_1_either counts a "
                             "target flipped by either one")
    parser.add_argument("--multi", type=int, default=0,
                        help="also run the multi-target mode: one training image against this many test images")
    parser.add_argument("--inception-weights", default=None,
                        help="Inception v3 weights file (default: the data directory's)")
    parser.add_argument("--cache-dir", default=None, help="default: <out>/../cache")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore the attacks an earlier run with the same settings recorded in "
                             "<out>/attacks.jsonl (by default a killed or partial run resumes from them, and runs "
                             "of different --only-deciles add up)")


def main(exp):

    from inception import BinaryInceptionModel, prepare_dogfish
    from influence.applications.attack import TrainingSetAttack, stratified_targets
    from influence.applications.attack_campaign import campaign_figure, mean_or_none as _mean, run_attacks, summarize
    from influence.result_store import Journal
    from influence.utils import hash_arrays

    args = exp.args
    if args.second_alone is None:  # off by default: a third attack per target would push the default past 3 h
        args.second_alone = False
    logging.getLogger("influence.generic_neural_net").setLevel(logging.WARNING)  # one re-fit per iteration
    n_train = args.n_train or (60 if args.quick else 900)
    n_test = args.n_test or (30 if args.quick else 300)
    max_iter = args.max_iter or (10 if args.quick else 30)
    cache = Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "cache"
    prep = prepare_dogfish(args.data_dir, cache, n_train=n_train, n_test=n_test, seed=args.seed,
                           weights=args.inception_weights, source=args.data_source)
    d, pre = prep.data, prep.preprocessing
    model = BinaryInceptionModel(weight_decay=0.001, seed=args.seed).fit(prep.F_train, d.y_train)
    model.attach(prep.feature_model, pre)
    test_acc = model.score(prep.F_test, d.y_test)
    correct = np.flatnonzero(model.predict(prep.F_test) == d.y_test)
    # log-odds of the true label: how far each target is from flipping
    margin_test = np.where(d.y_test == 1, 1.0, -1.0) * (prep.F_test @ model.theta_)
    rng = np.random.default_rng(args.seed)
    strata = None
    if args.all:
        mode, sample = "all", rng.permutation(correct)
    elif args.targets:
        mode, sample = "random", rng.choice(correct, min(args.targets, len(correct)), replace=False)
    else:
        n_strata = args.deciles or (2 if args.quick else 10)
        only = None if args.only_deciles is None else [int(v) - 1 for v in str(args.only_deciles).split(",") if v]
        strata = stratified_targets(margin_test, correct, n_strata, args.per_decile or (2 if args.quick else 10),
                                    seed=args.seed, strata=only)
        mode, sample = "stratified", rng.permutation(strata.targets)  # random order for the sweep subset
    n_targets = len(sample)
    targets = np.sort(sample)
    sweep_counts = sorted({int(c) for c in str(args.sweep_counts).split(",") if c.strip()} - {1, 2})
    if any(c < 1 for c in sweep_counts):
        raise ValueError(f"--sweep-counts must be positive integers, got {args.sweep_counts!r}")
    n_sweep = args.sweep_targets if args.sweep_targets is not None else (0 if args.quick else 5)
    sweep = set(sample[:max(0, n_sweep)].tolist()) if sweep_counts else set()
    n_rank = max([2] + sweep_counts)
    n_low = args.least_confident if args.least_confident is not None else (0 if args.quick else 10)
    least = correct[np.argsort(margin_test[correct])][:n_low]
    extra = np.setdiff1d(least, targets)
    logger.info("%s; top model: test accuracy %.4f; attacking %d of %d correctly classified test images (%s)",
                prep.source, test_acc, n_targets, len(correct), mode)

    inputs_train = pre(d.X_train)  # float32, model-input units
    att = TrainingSetAttack(model, inputs_train, prep.F_train, d.y_train, level=pre.level, bounds=pre.bounds,
                            step=args.step_levels * pre.level, max_iter=max_iter)
    journal = exp.out / "attacks.jsonl"
    if args.fresh and journal.exists():
        journal.unlink()
    book = Journal(journal, {"what": "fig5 attacks", "source": prep.source, "theta": hash_arrays(model.theta_),
                             "labels": hash_arrays(d.y_train, d.y_test), "level": pre.level,
                             "bounds": list(pre.bounds), "step": att.step, "max_iter": max_iter,
                             "prefilter": att.prefilter, "weights": str(args.inception_weights)})
    by_idx, best, c = run_attacks(att, book, np.concatenate([targets, extra]), prep.F_test, d.y_test, margin_test,
                                  d.X_train, pre, n_rank=n_rank, second_alone=args.second_alone, sweep=sweep,
                                  sweep_counts=sweep_counts)
    max_change, reused, ran, ranked_now = c["max_change"], c["reused"], c["ran"], c["ranked_now"]
    logger.info("attacks: %d run, %d reused from %s", ran, reused, journal)
    low_rows = [by_idx[int(t)] for t in least]
    rows = [by_idx[int(t)] for t in targets]
    sweep_rows = [by_idx[int(t)] for t in sample if int(t) in sweep]
    all_counts = [1, 2] + sweep_counts
    sweep_flipped = np.array([[r[f"flipped_{k}"] for k in all_counts] for r in sweep_rows],
                             dtype=bool).reshape(len(sweep_rows), len(all_counts))
    sweep_p_after = np.array([[r[f"p_true_after_{k}"] for k in all_counts] for r in sweep_rows],
                             dtype=float).reshape(len(sweep_rows), len(all_counts))
    f1, f2, by_strata, by_decile, bins = summarize(rows, strata, args.second_alone)
    margins = np.array([r["margin"] for r in rows])
    metrics = {"flip_rate_1": f1, "flip_rate_2": f2, "n_targets": n_targets, "test_accuracy": test_acc,
               "target_mode": mode, "data_source": prep.source, "n_correct": int(len(correct)),
               "n_test": int(len(d.y_test)),
               "target_margin_quantiles": dict(zip(("min", "q10", "median", "q90", "max"),
                                                   np.quantile(margins, [0, .1, .5, .9, 1]).round(3).tolist())),
               "flip_rates_by_margin": bins,
               "least_confident": {"n": len(low_rows), "margins": [round(r["margin"], 3) for r in low_rows],
                                   "flip_rate_1": _mean([r["flipped_1"] for r in low_rows]),
                                   "flip_rate_2": _mean([r["flipped_2"] for r in low_rows])},
               "max_abs_pixel_change": max_change, "perturbed_uint8_equal_original": True,
               "attacks_run": ran, "attacks_reused": reused, "rankings_run": ranked_now,
               "mean_iterations_1": float(np.mean([r["iterations_1"] for r in rows])),
               "mean_iterations_2": float(np.mean([r["iterations_2"] for r in rows])),
               "mean_seconds_per_target": float(np.mean([sum(r.get(f"seconds_{k}", 0.0) for k in (1, "1b", 2))
                                                         for r in rows]))}
    metrics.update(by_strata)
    if args.second_alone:  # the original's [2nd] try: the second-ranked image alone
        metrics["flip_rate_1_second"] = _mean([r["flipped_1b"] for r in rows])
        metrics["flip_rate_1_either"] = _mean([r["flipped_1_either"] for r in rows])
        metrics["least_confident"]["flip_rate_1_either"] = _mean([r["flipped_1_either"] for r in low_rows])

    if sweep_rows:
        rates = sweep_flipped.mean(axis=0).tolist()
        metrics["more_images"] = {
            "n_targets": len(sweep_rows), "counts": all_counts, "flip_rate": rates,
            "median_log_odds_after": np.median(np.log(sweep_p_after) - np.log1p(-sweep_p_after), axis=0).tolist(),
            "mean_iterations": [_mean([r[f"iterations_{k}"] for r in sweep_rows]) for k in all_counts]}
        metrics.update({f"flip_rate_{k}": rate for k, rate in zip(all_counts, rates) if k in sweep_counts})

    if args.multi:
        pool = np.flatnonzero((model.predict(prep.F_test) == d.y_test) & (d.y_test == 0))  # dogs, as the paper
        many = np.sort(np.random.default_rng(args.seed + 1).choice(pool, min(args.multi, len(pool)), replace=False))
        cand, _ = att.rank_candidates(prep.F_test[many], d.y_test[many], 1)
        res = att.attack(many, cand, prep.F_test, d.y_test)
        metrics.update({"multi_n_targets": len(many), "multi_flipped": int(res.flipped.sum()),
                        "multi_iterations": res.iterations, "multi_train_idx": int(cand[0])})

    t, i = int(best.test_indices[0]), int(best.train_indices[0])
    delta = (best.x_perturbed[0] - best.x_original[0]) / pre.level  # in 8-bit levels
    exp.save_arrays(test_indices=targets, candidates=np.array([r["candidates"] for r in rows]),
                    flipped_1=np.array([r["flipped_1"] for r in rows]), flipped_2=np.array([r["flipped_2"] for r in rows]),
                    p_true_before=np.array([r["p_true_before_1"] for r in rows]), margins=margins,
                    least_confident=least, least_confident_flipped_1=np.array([r["flipped_1"] for r in low_rows]),
                    least_confident_flipped_2=np.array([r["flipped_2"] for r in low_rows]),
                    p_true_after_1=np.array([r["p_true_after_1"] for r in rows]),
                    p_true_after_2=np.array([r["p_true_after_2"] for r in rows]),
                    iterations_1=np.array([r["iterations_1"] for r in rows]),
                    iterations_2=np.array([r["iterations_2"] for r in rows]),
                    example_train_idx=i, example_test_idx=t, example_delta_levels=delta.astype(np.float32),
                    example_perturbed_uint8=pre.to_uint8(best.x_perturbed[0]),
                    sweep_test_indices=np.array([r["test_idx"] for r in sweep_rows], dtype=int),
                    sweep_counts=np.array(all_counts),
                    sweep_flipped=sweep_flipped, sweep_p_true_after=sweep_p_after,
                    **({"stratum_of_target": strata.stratum, "stratum_targets": strata.targets,
                        "stratum_sizes": strata.sizes, "stratum_log_odds_median": strata.medians}
                       if strata is not None else {}),
                    **({"flipped_1_second": np.array([r["flipped_1b"] for r in rows]),
                        "p_true_after_1_second": np.array([r["p_true_after_1b"] for r in rows])}
                       if args.second_alone else {}))

    fig = campaign_figure(d, pre, best, rows + [by_idx[int(t)] for t in extra], by_decile, bins,
                          metrics["more_images"]["flip_rate"] if sweep_rows else None, all_counts)
    covered = sorted({int(v) + 1 for v in strata.stratum}) if strata is not None else []
    what = (f"of {n_targets} targets" if strata is None else
            "estimated over all correctly classified test images" if len(covered) == len(strata.sizes) else
            f"partial run: estimated over decile{'s' if len(covered) > 1 else ''} "
            f"{', '.join(map(str, covered))} of {len(strata.sizes)} only")
    fig.suptitle(f"Training-set attack{' (quick run: not comparable with the paper)' if args.quick else ''}: "
                 f"{f1:.0%} flipped with 1 image, {f2:.0%} with 2 ({what})\n"
                 f"ours: {prep.source}, test accuracy {test_acc:.3f}; paper: its own dog-fish split, "
                 f"test accuracy 0.985, 591 targets", fontsize=11)
    exp.save_figure(fig)
    targets_ = {} if args.quick else {"flip_rate_1": ">= 0.3", "flip_rate_2": ">= flip_rate_1",
                                      "max_abs_pixel_change": "<= 0.5"}
    if not args.quick and metrics.get("lowest_decile_flip_rate_1") is not None:
        targets_["lowest_decile_flip_rate_1"] = ">= 0.5"
    original = prep.source.startswith("original")
    exp.write_metrics(
        metrics, paper={"flip_rate_1": 0.57, "flip_rate_2": 0.77, "flip_rate_10": round(590 / 591, 4), "n_targets": 591,
                        "test_accuracy": 0.985, "max_abs_pixel_change": 0.5},
        targets=targets_,
        config={"step_levels": args.step_levels, "step_input_units": args.step_levels * pre.level,
                "max_iter": max_iter, "radius_levels": 0.5, "prefilter": att.prefilter, "target_mode": mode,
                "deciles": None if strata is None else int(len(strata.sizes)),
                "per_decile": None if strata is None else (args.per_decile or (2 if args.quick else 10)),
                "only_deciles": args.only_deciles, "data_source": prep.source,
                "n_train_per_class": n_train, "n_test_per_class": n_test, "weight_decay": 0.001, "seed": args.seed,
                "sweep_targets": len(sweep_rows), "sweep_counts": sweep_counts, "second_alone": args.second_alone},
        notes=("The original release's dog-fish images; " if original else
               "Stand-in classes (tench / English springer), separated more widely than the paper's (test accuracy "
               f"{test_acc:.3f} vs 0.985), so random targets sit far from the boundary; ")
        + "the paper attacked all 591 correctly classified test images of its split. flip_rate_1 / flip_rate_2 "
          "are estimated over all correctly classified test images (stratified sample reweighted by decile size) "
          "when the targets are stratified. Per-target results are in arrays.npz.")

if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))

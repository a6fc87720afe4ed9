"""Parameter importance (fANOVA) with a minimum-trials guard, a spread and a noise reference.
Pure, but slow (seconds at 1,000 trials): the operator runs it off the reconcile (handlers.py).

One fANOVA fit always names a winner, on pure noise too (two parameters get something like 55%
and 45% whatever their real effect), and below about 15 trials its ranking flips with the seed.
Fitting it again with other seeds does not help: on noise those fits agree on the same false
winner, because they share the data. So:

- nothing is computed below IMPORTANCE_MIN_TRIALS scored trials;
- it is fitted IMPORTANCE_RESAMPLES times, each on a bootstrap resample of the scored trials
  (drawn with replacement; at most IMPORTANCE_SAMPLE of them, which also bounds the cost) with
  a forest of its own seed. Each parameter gets its mean share of the objective's variance and
  the lowest and highest share of one resample, in percent;
- the trials also carry a reference parameter of random numbers (one per trial), unrelated to
  the objective by construction: whatever share it gets is what noise gets. A parameter whose
  lowest share is above the reference's highest is marked `signal`; one whose range overlaps
  the reference's is not told apart from noise. Measured on two parameters, 20 sweeps each:
  on pure noise it marked a parameter in 0 of 20 sweeps of 30 trials and 1 of 20 of 100 (five
  fits with other seeds on the same data kept a false winner's range apart in 10 of 12); a
  parameter explaining half the objective's variance was marked in 7 and 8 of 20.

Everything is seeded, so the same trials give the same figures, before or after a restart.
"""

from __future__ import annotations

import random
import statistics
import warnings
from collections.abc import Sequence

from sweep_operator.api import ImportanceShare, ParameterImportance, SweepSpec
from sweep_operator.objective import scorer
from sweep_operator.trials import ObservedTrial, TrialState

IMPORTANCE_MIN_TRIALS = 15
IMPORTANCE_RESAMPLES = 10
# Trials per resample: fANOVA's cost grows with the square of the trials (a forest's leaves
# times its splits); 200 keep one fit under a second.
IMPORTANCE_SAMPLE = 200
# Trees per fit: the resamples' spread dominates a small forest's own noise.
IMPORTANCE_TREES = 16
# Not a parameter name (those are identifiers), so it cannot clash with one.
REFERENCE = "(random reference)"


def _reference(trial: ObservedTrial) -> float:
    """The trial's value of the reference parameter: random, but fixed for the trial (seeded by
    its name), so that it sits in every resample as the parameters do, one value per trial."""
    return random.Random(f"importance-reference:{trial.name}").random()


def _shares(
    spec: SweepSpec, sample: list[tuple[ObservedTrial, float]], seed: int
) -> dict[str, float]:
    """One fANOVA fit: each parameter's and the reference's share of the variance (0 for a
    parameter that did not vary in the resample, and for all when the objective did not)."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from sweep_operator.search.tpe import distributions

    dists = {**distributions(spec), REFERENCE: FloatDistribution(0.0, 1.0)}
    rows = [
        ({**{n: t.parameters[n] for n in dists if n != REFERENCE}, REFERENCE: _reference(t)}, v)
        for t, v in sample
    ]
    shares = dict.fromkeys(dists, 0.0)
    # fANOVA cannot rate a parameter that took a single value in the resample.
    varied = [n for n in dists if len({repr(params[n]) for params, _ in rows}) > 1]
    if len({value for _, value in rows}) < 2:
        return shares
    study = optuna.create_study(direction=spec.objective.goal)
    study.add_trials(
        [create_trial(value=v, params=params, distributions=dists) for params, v in rows]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = optuna.importance.get_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(
                n_trees=IMPORTANCE_TREES, seed=seed
            ),
            params=varied,
        )
    shares.update({name: float(share) for name, share in fitted.items()})
    return shares


def _share(name: str, fits: list[dict[str, float]], noise_max: float | None) -> ImportanceShare:
    shares = [fit[name] for fit in fits]
    low = round(100 * min(shares), 1)
    return ImportanceShare(
        name=name,
        percent=round(100 * statistics.fmean(shares), 1),
        min=low,
        max=round(100 * max(shares), 1),
        signal=noise_max is not None and low > noise_max,
    )


def parameter_importance(spec: SweepSpec, trials: Sequence[ObservedTrial]) -> ParameterImportance:
    """Each searched parameter's share of the objective's variance, most important first, and
    the noise reference's; no shares (and a message saying why) below IMPORTANCE_MIN_TRIALS
    scored trials."""
    score = scorer(spec, trials)
    scored = sorted(
        (
            (t, value)
            for t in trials
            if t.state == TrialState.SUCCEEDED and (value := score.value(t)) is not None
        ),
        key=lambda tv: tv[0].index,
    )
    count = len(scored)
    if spec.objective.mode == "pareto" and spec.objective.metrics:
        return ParameterImportance(
            trials=count, message="not computed for objective.mode pareto (several objectives)"
        )
    if count < IMPORTANCE_MIN_TRIALS:
        return ParameterImportance(
            trials=count,
            message=f"computed from {IMPORTANCE_MIN_TRIALS} scored trials on; {count} so far "
            "(with fewer, fANOVA's ranking changes with its seed)",
        )
    if len({value for _, value in scored}) < 2:
        return ParameterImportance(
            trials=count, message="every scored trial has the same objective value"
        )
    size = min(count, IMPORTANCE_SAMPLE)
    fits = []
    for seed in range(IMPORTANCE_RESAMPLES):
        rng = random.Random(f"importance:{seed}")
        fits.append(_shares(spec, [rng.choice(scored) for _ in range(size)], seed))
    reference = _share(REFERENCE, fits, None)
    parameters = [
        _share(name, fits, reference.max) for name in sorted(fits[0]) if name != REFERENCE
    ]
    parameters.sort(key=lambda p: (-p.percent, p.name))
    return ParameterImportance(
        trials=count,
        parameters=parameters,
        reference=reference,
        message=f"fANOVA on {IMPORTANCE_RESAMPLES} bootstrap resamples of {size} of the {count} "
        "scored trials, with a reference parameter of random numbers: each parameter's mean "
        "share of the objective's variance in percent, and the lowest and highest; signal: its "
        "lowest share is above the reference's highest",
    )

"""``meddx rules``: selection rules, tried on a sample of an archive before a night
depends on them."""

from __future__ import annotations

import click

from meddx.cli.options import storage_option


@click.group()
def rules():
    """Selection rules: which DICOM images a model scores (docs/rules.md)."""


@rules.command()
@click.argument("file")
@click.argument("input_uri", metavar="INPUT")
@click.option("--sample", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many inputs to check (tar members count one each).")  # fmt: skip
@click.option("--seed", type=int, default=None,
              help="A random sample, drawn with this seed [default: the first N].")  # fmt: skip
@click.option("--each", is_flag=True, help="Also list each input checked and its outcome.")
@storage_option
def check(file, input_uri, sample, seed, each, storage):
    """Which inputs of INPUT each rule of FILE matches, and what the set keeps and skips.

    FILE is a rules file (TOML or YAML), or 'default' for meddx's default rules. Only the
    headers are read: no pixel is decoded, nothing is written.
    """
    from meddx.imaging.rules import DEFAULT
    from meddx.pipelines.dataset import load_rules
    from meddx.pipelines.rules_check import check as run

    rule_set = DEFAULT if file == "default" else load_rules(file, storage)
    found = run(rule_set, input_uri, storage, sample, seed)
    click.echo(
        f"checked {found.sampled} of {found.listed} inputs listed: kept {found.kept}, "
        f"skipped {found.skipped}, unreadable {found.unreadable} "
        f"({found.not_dicom} not DICOM: kept, no attributes to match)"
    )
    width = max([len(r.name) for r in rule_set.rules] + [4])
    click.echo(f"  {'rule':<{width}}  {'action':<7}  matched")
    for rule in rule_set.rules:
        click.echo(f"  {rule.name:<{width}}  {rule.action:<7}  {found.matched[rule.name]}")
    for reason, n in found.reasons.most_common():
        click.echo(f"skipped {n}: {reason}")
    if each:
        for uri, outcome in found.outcomes:
            click.echo(f"{uri}\t{outcome}")

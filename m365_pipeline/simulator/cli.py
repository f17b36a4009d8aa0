"""``m365-simulate``: serve both vendor APIs on loopback until SIGINT/SIGTERM, or print the ground truth.

On start it prints shell-sourceable ``export NAME=value`` lines for the pipeline, then a ``#``
comment saying where it serves: ``m365-simulate > sim.env &`` then ``. ./sim.env`` points a shell at it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from m365_pipeline.processes import young_garbage_collected_less
from m365_pipeline.simulator.dataset import (
    DEFAULT_ADMIN_TOKEN,
    DEFAULT_RESELLER_TOKEN,
    DEFAULT_SAAS_TOKEN,
    MAX_NIGHT,
    SimulatorConfig,
)
from m365_pipeline.simulator.faults import (
    CLAIMED_TOTAL_PAGES,
    DELETE_MOMENTS,
    MAX_HOSTILE_MIB,
    MAX_RATE_BURST,
    OWNER_DELETE_MOMENTS,
    SCOPES,
    FaultConfig,
)
from m365_pipeline.simulator.server import Simulator
from m365_pipeline.simulator.truth import ground_truth

PROG = "m365-simulate"


def _bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}" if high is not None
                                             else f"{value} must be at least {low}")
        return value
    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be a number of at least 0")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve source S (SaaS management) and source B (backup "
                                "reseller) APIs on loopback from deterministic synthetic data.")
    count = _bounded_int(0)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_bounded_int(0, 65535), default=8765,
                   help="0 picks a free port (default: %(default)s)")
    p.add_argument("--orgs", type=count, default=40, help="organizations (default: %(default)s)")
    p.add_argument("--users-per-org", type=count, default=17, help="users per organization (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="data and fault seed (default: %(default)s)")
    p.add_argument("--night", type=_bounded_int(0, MAX_NIGHT), default=0,
                   help="serve the data as it has evolved after this many nights: hires, leavers, license "
                        "changes, a tenant moving between customers, a customer arriving and one leaving "
                        "(default: %(default)s, the base data)")
    p.add_argument("--saas-token", default=DEFAULT_SAAS_TOKEN, help="source S bearer token")
    p.add_argument("--reseller-token", default=DEFAULT_RESELLER_TOKEN, help="source B X-Reseller-Token")
    p.add_argument("--admin-token", default=DEFAULT_ADMIN_TOKEN, help="source B admin X-Access-Token")
    p.add_argument("--print-ground-truth", action="store_true",
                   help="print the expected pipeline output (docs/RULES.md, rules 1-10) as JSON and exit")
    f = p.add_argument_group("faults", "deterministic given --seed; transient faults hit one URL at most "
                             "--max-faults-per-url times")
    f.add_argument("--fault-scope", dest="scope", choices=SCOPES, default="both",
                   help="source that --latency-ms and the random faults apply to")
    f.add_argument("--latency-ms", type=count, default=0, help="delay added to every response")
    f.add_argument("--jitter-ms", type=count, default=0, help="each delay varies by up to this, either way")
    f.add_argument("--rate-limit", type=_positive, default=0.0, metavar="PER_S",
                   help="requests/s allowed per API token, a token bucket refilled at this rate; over it, 429 "
                        "with Retry-After: 1 (more below 1/s) (0: no limit)")
    f.add_argument("--rate-burst", type=_bounded_int(1, MAX_RATE_BURST), default=20, metavar="N",
                   help="the bucket's size: requests a token may make at once before --rate-limit paces it "
                        "(default: %(default)s)")
    f.add_argument("--slow-match", type=_regex, metavar="REGEX", help="requests (path+query) to make slow")
    f.add_argument("--slow-ms", type=count, default=0, help="delay for --slow-match requests")
    f.add_argument("--rate-429", type=_rate, default=0.0, help="share of requests answered 429")
    f.add_argument("--retry-after", type=count, default=1, help="Retry-After seconds on 429s")
    f.add_argument("--rate-5xx", type=_rate, default=0.0, help="share of requests answered 500/502/503")
    f.add_argument("--fail-once", type=_regex, metavar="REGEX", help="first request to each matching URL gets 503")
    f.add_argument("--reset-rate", type=_rate, default=0.0, help="share of connections reset without response")
    f.add_argument("--malformed-match", type=_regex, metavar="REGEX", help="matching responses carry broken JSON")
    f.add_argument("--missing-field-match", type=_regex, metavar="REGEX",
                   help="matching responses have one record without its key field")
    f.add_argument("--down-after", type=count, help="after N requests to --down-scope, answer 503 forever")
    f.add_argument("--down-scope", choices=SCOPES, default="both", help="source that --down-after applies to")
    f.add_argument("--max-faults-per-url", type=count, default=2, help="transient fault budget per URL")
    h = p.add_argument_group("hostile answers", "permanent; a REGEX is searched in each 2xx answer's path+query")
    mib = _bounded_int(1, MAX_HOSTILE_MIB)
    h.add_argument("--oversize-match", type=_regex, metavar="REGEX",
                   help="matching answers are their JSON followed by --oversize-mib MiB of whitespace")
    h.add_argument("--oversize-mib", type=mib, default=65, metavar="N",
                   help=f"at most {MAX_HOSTILE_MIB} (default: %(default)s)")
    h.add_argument("--gzip-bomb-match", type=_regex, metavar="REGEX",
                   help="matching answers are sent gzip-encoded, a small body inflating to --gzip-bomb-mib MiB")
    h.add_argument("--gzip-bomb-mib", type=mib, default=1024, metavar="N",
                   help=f"at most {MAX_HOSTILE_MIB} (default: %(default)s)")
    h.add_argument("--claim-pages-match", type=_regex, metavar="REGEX",
                   help=f"matching source S pages claim {CLAIMED_TOTAL_PAGES:,} total_pages (total_items true)")
    h.add_argument("--endless-next-match", type=_regex, metavar="REGEX",
                   help="matching source B pages always link a next_page, past the end too")
    h.add_argument("--echo-headers-on-error", action="store_true",
                   help="every 4xx/5xx body lists the request's headers, tokens included, and its "
                        "X-Debug-Request-Token header repeats the request's token, as a vendor's debug page")
    f.add_argument("--delete-saas-user", choices=DELETE_MOMENTS,
                   help="delete source S's first user right after page 1 (later pages shift) or the last page "
                        "(its subscriptions then answer 404) of the user list was served")
    f.add_argument("--delete-backup-account", choices=DELETE_MOMENTS[:1],
                   help="delete the first mailbox of source B's largest m365 tenant right after page 1 of its "
                        "list was served (later pages shift)")
    f.add_argument("--delete-backup-owner", choices=OWNER_DELETE_MOMENTS,
                   help="delete source B's first owner right after its GET /users/{id}, or when its tenants or "
                        "its first tenant's mailboxes are asked for (that call answers 404)")
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Raises ValueError for combinations argparse cannot check alone (e.g. rates summing above 1)."""
    values: dict[str, Any] = vars(args)
    faults = FaultConfig(**{f.name: values[f.name] for f in fields(FaultConfig)})
    return SimulatorConfig(orgs=args.orgs, users_per_org=args.users_per_org, seed=args.seed,
                           saas_token=args.saas_token, reseller_token=args.reseller_token,
                           admin_token=args.admin_token, faults=faults, night=args.night)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_ground_truth:
        try:
            json.dump(ground_truth(config), sys.stdout, ensure_ascii=False, indent=1)
            print(flush=True)
        except BrokenPipeError:  # e.g. piped into `head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    sim = Simulator(config, host=args.host, port=args.port)
    try:
        sim.start()
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for name, value in sim.env.items():
            print(f"export {name}={shlex.quote(value)}")
        print(f"# {PROG}: serving {config.orgs} organizations, {sim.dataset.saas_user_count} source S users "
              f"on {sim.base_url} (seed {config.seed}, night {config.night}); Ctrl-C to stop", flush=True)
        # What is alive now lives until the simulator stops, and each answer's objects die young.
        with young_garbage_collected_less():
            while not stop.wait(0.5):
                pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `gpudelivery` command: offline settlement, proofs, verification and keys.

Each subcommand is a thin shell around the core: it reads files, calls one core function
and prints. Machine-readable results (settlements, proofs) go to standard output as JSON;
human messages go to standard error. Exit codes: 0 success, 1 a proof that does not
verify, 2 bad input or usage (with a one-line reason naming the file and line).
Later components (the API, the operator, the metering agent) add their own subcommands.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from gpudelivery import accounting, errors, inputs, proof, settlement, signing, timefmt

__all__ = ["app", "main", "served_app"]

# Exit status for a proof that was read but does not verify.
EXIT_NOT_VERIFIED = 1
# Exit status for bad input or usage (typer and click use 2 for usage errors too).
EXIT_BAD_INPUT = 2

app = typer.Typer(
    name="gpudelivery",
    help="Deliver, meter, prove and settle GPU-compute futures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Ed25519 keys for signing proofs and meter batches.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
api_app = typer.Typer(
    help="The settlement and proof API (GPUDELIVERY_DATABASE_URL, GPUDELIVERY_API_*).",
    no_args_is_help=True,
)
app.add_typer(api_app, name="api")
api_keys_app = typer.Typer(help="API keys of the API's principals.", no_args_is_help=True)
api_app.add_typer(api_keys_app, name="keys")
operator_app = typer.Typer(
    help="The delivery operator (GPUDELIVERY_OPERATOR_*).", no_args_is_help=True
)
app.add_typer(operator_app, name="operator")

_err = Console(stderr=True, highlight=False)

TermsOption = Annotated[Path, typer.Option("--terms", help="TERMS.json: the contract terms.")]
AssignOption = Annotated[
    Path, typer.Option("--assignments", help="ASSIGN.jsonl: the assignment ledger.")
]
MeterOption = Annotated[Path, typer.Option("--meter", help="METER.jsonl: the meter records.")]


def _fail(message: str) -> NoReturn:
    _err.print(f"gpudelivery: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _write_json(document: Any, out: Path | None) -> None:
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"{out}: cannot write: {exc.strerror}")


def _parse_instant(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        return timefmt.parse_utc(value, field=option)
    except errors.InputError as exc:
        _fail(str(exc))


@app.command()
def settle(terms: TermsOption, assignments: AssignOption, meter: MeterOption) -> None:
    """Compute a contract's settlement (shared/SETTLEMENT.md) and print it as JSON."""
    try:
        contract = inputs.read_terms(terms)
        ledger = inputs.read_assignments(assignments)
        result = accounting.account(
            gpu_count=contract.gpu_count,
            contract_id=contract.contract_id,
            window=(contract.start, contract.end),
            assignments=ledger,
            records=(record for _, record in inputs.iter_meter_records(meter)),
        )
    except inputs.InputFileError as exc:
        _fail(str(exc))
    figures = settlement.settle(contract, delivered_gpu_seconds=result.delivered_gpu_seconds)
    _write_json(figures.to_json(), None)


@app.command()
def prove(
    terms: TermsOption,
    assignments: AssignOption,
    meter: MeterOption,
    key: Annotated[Path, typer.Option("--key", help="PEM PKCS#8 Ed25519 private key.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write here, not to stdout.")] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Count delivery up to this RFC 3339 instant (provisional)."),
    ] = None,
    issued_at: Annotated[
        str | None, typer.Option("--issued-at", help="RFC 3339 issue time (default: now).")
    ] = None,
) -> None:
    """Build a signed delivery proof from the ledger and the meter records."""
    as_of_s = _parse_instant(as_of, "--as-of")
    issued_s = _parse_instant(issued_at, "--issued-at")
    try:
        signing_key = signing.load_private_pem(key.read_bytes())
    except OSError as exc:
        _fail(f"{key}: cannot read: {exc.strerror}")
    except errors.SignatureError as exc:
        _fail(f"{key}: {exc}")
    try:
        contract = inputs.read_terms(terms)
        ledger = inputs.read_assignments(assignments)
        if as_of_s is not None and as_of_s < contract.start:
            _fail("--as-of: precedes the contract window's start")
        stream = proof.MeterRecordStream(inputs.iter_meter_records(meter))
        document = proof.build_proof(
            terms=contract,
            assignments=ledger,
            records=stream,
            meter_evidence=stream.evidence,
            key=signing_key,
            issued_at_s=issued_s if issued_s is not None else int(time.time()),
            as_of_s=as_of_s,
        )
    except inputs.InputFileError as exc:
        _fail(str(exc))
    _write_json(document, out)


@app.command()
def verify(
    proof_file: Annotated[Path, typer.Argument(metavar="PROOF", help="The proof JSON file.")],
    pubkey: Annotated[Path, typer.Option("--pubkey", help="The provider's PEM public key.")],
    meter: Annotated[
        Path | None,
        typer.Option("--meter", help="METER.jsonl: also check the proof against raw records."),
    ] = None,
) -> None:
    """Check a proof's signature and evidence, and recompute its settlement."""
    try:
        public_key = signing.load_public_pem(pubkey.read_bytes())
    except OSError as exc:
        _fail(f"{pubkey}: cannot read: {exc.strerror}")
    except errors.SignatureError as exc:
        _fail(f"{pubkey}: {exc}")
    try:
        document = inputs.read_json(proof_file)
        raw_records = None if meter is None else inputs.iter_meter_records(meter)
        outcome = proof.verify(document, public_key, meter_records=raw_records)
    except inputs.InputFileError as exc:
        _fail(str(exc))
    except errors.ProofError as exc:
        _fail(f"{proof_file}: not a delivery proof: {exc}")
    out = Console(highlight=False)
    if outcome.ok:
        figures = outcome.settlement
        out.print(
            f"[green]verified[/]: contract {outcome.contract_id}, signed by {outcome.key_id}; "
            f"delivered {figures['delivered_gpu_seconds']} of "
            f"{figures['contracted_gpu_seconds']} GPU-seconds, net {figures['net']} "
            f"{figures['currency']}"
            + ("; checked against the meter records" if meter is not None else ""),
            soft_wrap=True,
        )
        return
    out.print(f"[red]NOT verified[/]: {proof_file}", soft_wrap=True)
    for problem in outcome.problems:
        out.print(f"  - {problem}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_NOT_VERIFIED)


@keys_app.command("generate")
def keys_generate(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the key files.")] = Path(
        "."
    ),
    name: Annotated[str, typer.Option("--name", help="File stem: NAME.key and NAME.pub.")] = (
        "gpudelivery"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Generate an Ed25519 key pair: NAME.key (PEM PKCS#8, mode 0600) and NAME.pub."""
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            _fail(f"{path}: already exists (use --force to replace it)")
    key = signing.generate()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        descriptor = os.open(private_path, flags, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(key.private_pem())
        os.chmod(private_path, 0o600)
        public_path.write_bytes(signing.public_pem(key.public_key))
    except OSError as exc:
        _fail(f"{out_dir}: cannot write keys: {exc.strerror}")
    sys.stdout.write(f"{key.key_id}\n")
    _err.print(f"wrote {private_path} (private, keep it secret) and {public_path}", markup=False)


@app.command()
def meter(
    once: Annotated[
        bool, typer.Option("--once", help="Print one sampling round as JSON lines and exit.")
    ] = False,
    interval_s: Annotated[
        int, typer.Option("--interval", min=1, max=60, help="With --once: seconds sampled.")
    ] = 1,
) -> None:
    """The metering agent (configured by GPUDELIVERY_METER_* variables; see the README).

    With --once: sample every GPU over one interval, print the records, one JSON line per
    GPU, and exit, to check a node by hand."""
    # Imported here, so that the offline commands never load NVML.
    from gpudelivery.metering import errors as metering_errors
    from gpudelivery.metering import nvml, sampling

    if not once:
        _run_agent()
        return
    try:
        source = nvml.PynvmlSource()
    except metering_errors.NvmlUnavailableError as exc:
        _fail(str(exc))
    try:
        sampler = sampling.Sampler(source, interval_s=interval_s, max_interval_s=2 * interval_s)
        start_s = int(time.time()) + 1
        for at_s in (start_s, start_s + interval_s):
            time.sleep(max(0.0, at_s - time.time()))
            records = sampler.round(at_s)
        for record in records:
            sys.stdout.write(json.dumps(record, sort_keys=False) + "\n")
    finally:
        source.close()


def _run_agent() -> None:
    # Imported here, so that the offline commands never load NVML.
    import logging
    import signal
    import threading

    import pydantic

    from gpudelivery.metering import agent
    from gpudelivery.metering import errors as metering_errors
    from gpudelivery.metering.settings import MeterSettings

    try:
        settings = MeterSettings()  # type: ignore[call-arg]  # node_name comes from the environment
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        _fail(f"GPUDELIVERY_METER_{where.upper().replace('.', '__')}: {first['msg']}")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s node=" + settings.node_name + " %(message)s",
    )
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    try:
        agent.Agent(settings).run(stop)
    except metering_errors.MeteringError as exc:
        _fail(str(exc))


def _api_settings() -> Any:
    import pydantic

    from gpudelivery.api.settings import ApiSettings

    try:
        return ApiSettings()
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        _fail(f"GPUDELIVERY_API_{where.upper()}: {first['msg']}")


@operator_app.command("run")
def operator_run() -> None:
    """Run the delivery operator against the cluster (configured by GPUDELIVERY_OPERATOR_*
    variables; see the README): books ComputeContracts on DeliveryPools."""
    import logging

    import pydantic

    from gpudelivery.operator import runner
    from gpudelivery.operator.settings import OperatorSettings

    try:
        settings = OperatorSettings()
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = "__".join(str(part) for part in first["loc"]) or "settings"
        _fail(f"GPUDELIVERY_OPERATOR_{where.upper()}: {first['msg']}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        runner.run(settings)
    except errors.GpuDeliveryError as exc:
        _fail(str(exc))


@api_app.command("migrate")
def api_migrate() -> None:
    """Bring the database to the newest schema (run before `api serve`, and on upgrades)."""
    import sqlalchemy.exc

    from gpudelivery.api import migrations

    settings = _api_settings()
    try:
        migrations.upgrade(settings.database_url)
        revision = migrations.revision_of(settings.database_url)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        _fail(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    _err.print(f"database at revision {revision}", markup=False)


# Ingest turns a request body into some 10^4 to 10^5 objects, alive until the answer. At
# CPython's default threshold (a young collection every 700 new objects) they are traversed
# again and again and soon set off full collections of the whole heap, a fifth of the
# server's time; every 50,000, with the heap built at startup frozen out of collections,
# it is a few cheap ones a request. Cycles are still collected.
_SERVING_GC_THRESHOLD = 50_000


def _tune_gc_for_serving() -> None:
    import gc

    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_SERVING_GC_THRESHOLD, older, oldest)


def served_app() -> Any:
    """The application as each worker of `api serve --workers N` builds it: from the same
    environment as the command, which has checked it already."""
    from gpudelivery.api.app import create_app

    application = create_app(_api_settings())
    _tune_gc_for_serving()
    return application


@api_app.command("serve")
def api_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes (PostgreSQL only: SQLite has one writer). Each is a "
            "replica: one leads the periodic jobs, and /metrics counts the answering one's.",
        ),
    ] = 1,
) -> None:
    """Serve the API with uvicorn (the database must be migrated)."""
    import uvicorn

    from gpudelivery.api import db, migrations
    from gpudelivery.api.app import create_app

    settings = _api_settings()
    engine = db.engine_for(settings.database_url)
    if workers > 1 and not db.is_postgresql(engine):
        _fail(
            f"--workers {workers}: SQLite takes one writer at a time, so it is served by one "
            "worker; use PostgreSQL (GPUDELIVERY_DATABASE_URL) for more"
        )
    if migrations.revision_of(settings.database_url) is None:
        _fail("the database is not migrated: run `gpudelivery api migrate` first")
    try:
        # Built here in any case: a bad setting fails now, and the provider key is created
        # once, before workers could race to create it.
        application = create_app(settings, engine=engine)
    except errors.InputError as exc:
        _fail(str(exc))
    if workers == 1:
        _tune_gc_for_serving()
        uvicorn.run(application, host=host, port=port, log_level="info")
        return
    engine.dispose()
    _serve_workers(host, port, workers)


def _serve_workers(host: str, port: int, workers: int) -> None:
    """`uvicorn.run` with workers, but for the socket the workers share: uvicorn makes it
    with protocol 0, and asyncio sets TCP_NODELAY only on connections whose socket says
    TCP, so every answer on a kept-alive connection would wait some 40 ms for the client's
    delayed ACK (uvicorn issue 3149). The socket is wrapped again as TCP."""
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "gpudelivery.cli:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )
    bound = config.bind_socket()
    listener = socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, bound.detach())
    listener.set_inheritable(True)
    Multiprocess(config, sockets=[listener]).run()


@api_keys_app.command("create")
def api_keys_create(
    role: Annotated[str, typer.Option(help="admin, exchange, buyer, operator or meter.")],
    name: Annotated[str, typer.Option(help="The principal: an exchange's or buyer's name.")],
) -> None:
    """Create an API key and print it, once: only its hash is kept."""
    from sqlmodel import Session

    from gpudelivery.api import auth, db

    try:
        chosen = auth.Role(role)
    except ValueError:
        _fail(f"--role: must be one of {', '.join(r.value for r in auth.Role)}")
    if not 0 < len(name) <= 128:
        _fail("--name: must be 1 to 128 characters")
    engine = db.engine_for(_api_settings().database_url)
    with Session(engine) as session:
        key, token = auth.create_key(session, name=name, role=chosen)
        session.commit()
        key_id = key.id
    sys.stdout.write(token + "\n")
    _err.print(f"created key {key_id} for {name} ({chosen.value}); it is not shown again")


@api_keys_app.command("revoke")
def api_keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke an API key: it answers 401 from now on."""
    from sqlmodel import Session

    from gpudelivery.api import auth, db
    from gpudelivery.api import errors as api_errors

    engine = db.engine_for(_api_settings().database_url)
    with Session(engine) as session:
        try:
            auth.revoke_key(session, key_id=key_id)
        except api_errors.ApiError as exc:
            _fail(exc.detail)
        session.commit()
    _err.print(f"revoked key {key_id}")


def main() -> None:
    """Console entry point."""
    app()

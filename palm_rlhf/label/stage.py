"""`palm-rlhf label`: load the model(s), open the label file, serve the page until Ctrl-C."""

from __future__ import annotations

import secrets
import socket
from typing import Optional

from beartype import beartype

from palm_rlhf.label.config import LabelConfig
from palm_rlhf.label.items import Generate, Prefetcher, item_builder, item_specs
from palm_rlhf.label.session import LabelSession
from palm_rlhf.label.store import LabelFileError, LabelStore

EXTRA_HINT = 'palm-rlhf label needs the label extra: pip install "palm-rlhf[label]"'


@beartype
def build_session(
    config: LabelConfig,
    prompts: list,
    generate: Generate,
    generate_b: Optional[Generate] = None,
    log=print,
    **session_options,
) -> LabelSession:
    """The labelling job of `config` over `prompts`, continuing `config.out`, with items
    generated in the background by `generate` (and `generate_b` in arena mode). Tests and
    scripts pass any function here; `run_label` passes the checkpoints' samplers."""
    if config.mode == "arena" and generate_b is None:
        raise ValueError("arena mode needs generate_b, the second checkpoint's sampler")
    store = LabelStore(config.out, config.mode)
    if store.labels.repaired:
        log(f"{config.out}: dropped a last line cut short by a crash (it was never confirmed)")
    done = store.done_ids()
    specs = item_specs(prompts, config.mode, config.seed, config.passes)
    todo = [spec for spec in specs if spec.id not in done]
    build = item_builder(config.mode, generate, config.responses, generate_b)
    prefetcher = Prefetcher(todo, build, config.ahead, log=log).start()
    return LabelSession(specs, store, prefetcher, scale=config.scale, **session_options)


def choose_token(token: Optional[str], loopback: bool) -> Optional[str]:
    """--token if given; else none on loopback, where only this machine can connect, and a
    fresh unguessable one on any other address, where anyone on the network could."""
    return token or (None if loopback else secrets.token_urlsafe(24))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # listen now: a browser or script that connects as soon as the URL is printed waits in
        # the backlog instead of being refused while the server is still starting
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise SystemExit(
            f"palm-rlhf label: cannot listen on {host}:{port}: {error.strerror}"
        ) from None
    return sock


@beartype
def run_label(config: LabelConfig) -> None:
    """Serve the labelling page; print its URL (with the token, once) and the label file."""
    try:
        import uvicorn

        from palm_rlhf.label.app import create_app
        from palm_rlhf.label.security import is_loopback
    except ImportError:
        raise SystemExit(EXTRA_HINT) from None
    from palm_rlhf.label.backend import model_generator, read_prompts

    loopback = is_loopback(config.host)
    token = choose_token(config.token, loopback)
    sock = _bind(config.host, config.port)
    try:
        prompts = read_prompts(config.prompts)
        generate = model_generator(config.checkpoint, config)
        generate_b = model_generator(config.checkpoint_b, config) if config.checkpoint_b else None
        session = build_session(config, prompts, generate, generate_b)
    except (OSError, ValueError, LabelFileError) as error:  # missing files, bad records
        sock.close()
        raise SystemExit(f"palm-rlhf label: {error}") from None
    app = create_app(session, config.settings(), token=token, loopback_only=loopback)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    progress = session.progress()
    print(
        f"labelling {progress['total'] - progress['labelled']} of {progress['total']} items "
        f"({config.mode} mode) into {config.out}",
        flush=True,
    )
    print(
        f"open {url}" + ("  (the token is shown only now; keep it secret)" if token else ""),
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        session.prefetcher.stop()

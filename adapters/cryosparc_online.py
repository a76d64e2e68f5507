"""A running cryoSPARC instance through cryosparc-tools: load a job's particles, publish results.

Every server call goes through the ``cs`` object (``cryosparc.tools.CryoSPARC``) handed in, so
tests use a fake that records the calls (INTEROP.md 4.7). API used (cryosparc-tools 5.x,
INTEROP.md 4.3-4.6): ``cs.find_project(P)``, ``project.find_job(J).load_output(name)``,
``project.dir``, ``project.create_external_job(W, title=...)``, ``job.connect``,
``job.add_output(..., passthrough="particles")``, ``with job.run():``, ``job.alloc_output``,
``job.save_output``, ``job.log``.

Results go back as one External job whose input is the source job's particles and whose
outputs are ``particles`` (every particle: new ``alignments3D`` poses and one
``components_mode_<m>`` slot per normal mode holding its amplitude, the cryoSPARC 3DVA /
3D Flex convention for per-particle continuous values) and one output per group with the
same slots, each carrying the other slots through from the input by uid.

`connect` checks the server address and credentials before connecting (INTEROP.md 4.2) and
turns every connection failure into one `InputError` line saying what to set; a server whose
major.minor version differs from the installed cryosparc-tools' (which cryosparc-tools only warns
about) is such an error too, naming both versions and the ``pip install`` of the matching tools.

`publish_results` takes the results as ``.cs`` files, ``ParticleTable`` s or ``Dataset`` s
(`deephemnma_bridge.adapters.dataset_from_particles`, no file in between).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import numpy as np
from cryosparc.dataset import Dataset

from deephemnma_bridge.errors import InputError
from deephemnma_bridge.particles import ParticleTable

__all__ = [
    "connect",
    "connection_settings",
    "download_particles",
    "one_line",
    "publish_results",
    "server_errors",
    "version_mismatch",
]

_LOGIN = "python -m cryosparc.tools login --url URL"


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc`` (or of its cause when that says more)."""
    for err in (exc.__cause__, exc):
        if err is not None:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            if lines:
                return lines[0]
    return type(exc).__name__


def connection_settings(
    *,
    url: str | None = None,
    email: str | None = None,
    environ: Mapping[str, str] | None = None,
    tools_version: str,
) -> dict[str, Any]:
    """Keyword arguments for ``cryosparc.tools.CryoSPARC`` of version ``tools_version`` from
    ``url`` / ``email`` (command line) and the environment (``CRYOSPARC_BASE_URL``,
    ``CRYOSPARC_MASTER_HOSTNAME``, ``CRYOSPARC_BASE_PORT``, ``CRYOSPARC_EMAIL``,
    ``CRYOSPARC_PASSWORD``, ``CRYOSPARC_LICENSE_ID``). Every argument is given explicitly:
    cryosparc-tools reads its defaults from the environment once, at import.

    Raises
    ------
    InputError
        One line naming what is missing and how to give it.
    """
    env = os.environ if environ is None else environ
    get = lambda key: (env.get(key) or "").strip() or None  # noqa: E731
    url = (url or "").strip() or get("CRYOSPARC_BASE_URL")
    host, port = get("CRYOSPARC_MASTER_HOSTNAME"), get("CRYOSPARC_BASE_PORT")
    email = (email or "").strip() or get("CRYOSPARC_EMAIL")
    password, license_id = get("CRYOSPARC_PASSWORD"), get("CRYOSPARC_LICENSE_ID")
    if url:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            url_port = parts.port
        except ValueError:
            url_port = -1
        if not parts.hostname or url_port == -1:
            raise InputError(f"cryoSPARC URL {url!r} is not a web address like http://host:39000")
        url = f"{parts.scheme}://{parts.netloc}"
        host, port = parts.hostname, str(url_port or 39000)
    elif not host and not port:
        raise InputError(
            "no cryoSPARC server given: pass --url http://HOST:39000 (its web address) or set "
            "CRYOSPARC_BASE_URL (or CRYOSPARC_MASTER_HOSTNAME and CRYOSPARC_BASE_PORT)"
        )
    if port is not None and not port.isdigit():
        raise InputError(f"CRYOSPARC_BASE_PORT must be a port number, got {port!r}")
    if int(tools_version.split(".")[0]) >= 5:
        if url:
            return {
                "base_url": url,
                "host": None,
                "base_port": None,
                "email": email,
                "password": password,
                "license": license_id,
            }
        return {
            "base_url": None,
            "host": host or "localhost",
            "base_port": int(port or 39000),
            "email": email,
            "password": password,
            "license": license_id,
        }
    # cryosparc-tools 4.x: CryoSPARC(license, host, base_port, email, password), all needed
    missing = [
        name
        for name, value in (
            ("CRYOSPARC_LICENSE_ID", license_id),
            ("CRYOSPARC_EMAIL (or --email)", email),
            ("CRYOSPARC_PASSWORD", password),
        )
        if not value
    ]
    if missing:
        raise InputError(
            f"cryosparc-tools {tools_version} needs {', '.join(missing)} to connect; set "
            f"{'it' if len(missing) == 1 else 'them'} in the environment"
        )
    return {
        "license": license_id,
        "host": host or "localhost",
        "base_port": int(port or 39000),
        "email": email,
        "password": password,
    }


def server_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failed server call (network, HTTP, cryoSPARC API)."""
    from cryosparc import errors

    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    for name in ("APIError", "CommandError", "ExternalJobError"):
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    try:
        import httpx
    except ImportError:  # cryosparc-tools 4.x talks through urllib (OSError)
        pass
    else:
        kinds.append(httpx.HTTPError)
    return tuple(kinds)


def connect(
    *,
    url: str | None = None,
    email: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """A connected ``cryosparc.tools.CryoSPARC``.

    cryosparc-tools releases follow CryoSPARC's: tools ``X.Y.*`` talk to a CryoSPARC ``vX.Y.*``
    server (5.x to v5 through ``/api/cmd``, 4.x to v4). The tools only warn about another
    server version; here it is an error saying which ``pip install`` fixes it.

    Raises
    ------
    InputError
        Missing address or credentials (checked first), refused login, unreachable server, or a
        server of another version than the installed cryosparc-tools (both versions and the
        ``pip install "cryosparc-tools~=X.Y.0"`` that matches the server), in one line that
        says what to do.
    """
    from cryosparc import __version__ as tools_version
    from cryosparc.tools import CryoSPARC

    kwargs = connection_settings(url=url, email=email, environ=environ, tools_version=tools_version)
    where = kwargs.get("base_url") or f"http://{kwargs['host']}:{kwargs['base_port']}"
    login = _LOGIN.replace("URL", where)
    failures: tuple[type[BaseException], ...] = (TypeError, RuntimeError, *server_errors())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded here, shown again below unless handled
        warnings.filterwarnings("ignore", message=r".*API client")  # per-attempt retries
        if kwargs.get("license") and int(tools_version.split(".")[0]) >= 5:
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            cs = CryoSPARC(**kwargs)
        except ValueError as exc:  # v5: neither email + password nor a stored session
            if "authentication" not in str(exc):
                raise InputError(f"cryoSPARC at {where}: {one_line(exc)}") from exc
            raise InputError(
                f"no cryoSPARC login for {where}: set CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD, "
                f"or log in once with `{login}`"
            ) from exc
        except failures as exc:
            if int(tools_version.split(".")[0]) >= 5 and _no_api(exc):
                raise InputError(
                    f"cryoSPARC at {where} answered, but without the API of CryoSPARC "
                    f"v{_major_minor(tools_version)} that cryosparc-tools {tools_version} "
                    f"needs: an older CryoSPARC (v4.x)? Install the cryosparc-tools of the "
                    f"server's major.minor version (`cryosparcm status` shows it), e.g. "
                    f'pip install "cryosparc-tools~=4.6.0" for v4.6; or check the address'
                ) from exc
            raise InputError(
                f"cannot connect to cryoSPARC at {where} ({one_line(exc)}); check the address "
                f"(--url / CRYOSPARC_BASE_URL), that the server runs, the credentials, and that "
                f"cryosparc-tools {tools_version} matches the server's version"
            ) from exc
    for w in caught:
        found = _MISMATCH.search(str(w.message))
        if found:
            raise InputError(version_mismatch(where, found[1], found[2]))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return cs


# cryosparc-tools' warning on a server of another version (tools.py): 5.x "CryoSPARC at URL
# with version v4.6.2 may not be compatible with current cryosparc-tools version 5.0.3.", 4.x
# "CryoSPARC instance HOST:PORT with version v5.0.1 may not be compatible with current
# cryosparc-tools version v4.7.1."
_MISMATCH = re.compile(
    r"with version (v?\d+\.\d+\S*) may not be compatible with current cryosparc-tools "
    r"version v?(\d+\.\d+[\w.+-]*?)\.?(?:\s|$)"
)


def _major_minor(version: str) -> str:
    """``"v4.6.2"`` -> ``"4.6"``."""
    return ".".join(version.lstrip("v").split(".")[:2])


def version_mismatch(where: str, server_version: str, tools_version: str) -> str:
    """One line: the server at ``where`` and the installed cryosparc-tools differ in
    major.minor version, and the ``pip install`` that gives the matching tools."""
    want = _major_minor(server_version)
    return (
        f"cryoSPARC at {where} is version {server_version} but cryosparc-tools is "
        f"{tools_version}; cryosparc-tools must match the server's major.minor version: "
        f'pip install "cryosparc-tools~={want}.0"'
    )


def _no_api(exc: BaseException) -> bool:
    """True when the server answered but has no OpenAPI schema at cryosparc-tools 5.x's
    ``/api/cmd/openapi.json`` (not JSON, 404, or JSON without paths): not a CryoSPARC v5."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, json.JSONDecodeError) or "Error reading JSON response" in text:
            return True
        if isinstance(err, AssertionError) and "Invalid OpenAPI schema" in text:
            return True
        response: Any = getattr(err, "response", None)
        if getattr(response, "status_code", None) == 404:
            try:
                request_url = str(response.request.url)
            except (AttributeError, RuntimeError):  # httpx: no request set on the response
                request_url = ""
            if request_url.endswith("/openapi.json"):
                return True
        err = err.__cause__ or err.__context__
    return False


def download_particles(
    cs: Any, project_uid: str, job_uid: str, output: str, dest: Path
) -> tuple[Path, Path]:
    """Save job ``job_uid``'s output ``output`` (all slots) as ``dest``; return (dest, project
    directory, against which the dataset's blob paths are relative)."""
    project = cs.find_project(project_uid)
    job = project.find_job(job_uid)
    try:
        dataset = job.load_output(output, slots="all")
    except Exception as exc:  # the server's own error type varies between versions
        raise InputError(
            f"cryoSPARC {project_uid} {job_uid}: cannot load output {output!r} ({exc})"
        ) from exc
    if len(dataset) == 0:
        raise InputError(f"cryoSPARC {project_uid} {job_uid} output {output!r} has no particles")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dataset.save(dest)
    return dest, Path(str(project.dir))


def _fill(target: Dataset, source: Dataset, mode_numbers: list[int]) -> Dataset:
    """Copy the fields the server expects from our results (matched by uid)."""
    order = {int(u): k for k, u in enumerate(source["uid"])}
    rows = np.array([order[int(u)] for u in target["uid"]])
    for field in target.fields():
        if field == "uid":
            continue
        if field in source.fields():
            target[field] = source[field][rows]
        for m in mode_numbers:
            if field == f"components_mode_{m}/component":
                target[field] = m
            elif field == f"components_mode_{m}/value":
                target[field] = np.asarray(source[f"dhn/dhnAmplitude{m}"])[rows]
    return target


Results: TypeAlias = str | os.PathLike[str] | ParticleTable | Dataset
"""What `publish_results` takes for the particles and each group."""


def _results(value: Results, name: str) -> tuple[Dataset, str]:
    """``value`` as a dataset, and how to name it in an error message."""
    if isinstance(value, Dataset):
        return value, f"results {name!r}"
    if isinstance(value, ParticleTable):
        from .cryosparc import dataset_from_particles

        return dataset_from_particles(value), f"results {name!r}"
    return Dataset.load(value), str(value)


def publish_results(
    cs: Any,
    project_uid: str,
    workspace_uid: str,
    source: tuple[str, str],
    particles: Results,
    groups: Mapping[str, Results],
    mode_numbers: list[int],
    *,
    title: str = "DeepHEMNMA",
) -> str:
    """Create the External job with the results; return its uid.

    ``particles`` (every particle, with ``dhnAmplitude<m>`` values for each mode ``m`` of
    ``mode_numbers``) and each group of ``groups`` are ``.cs`` files, ``ParticleTable`` s (made
    into datasets in memory by `dataset_from_particles`) or ``Dataset`` s.
    """
    results, label = _results(particles, "particles")
    for m in mode_numbers:
        if f"dhn/dhnAmplitude{m}" not in results.fields():
            raise InputError(f"{label}: no amplitude of mode {m} to publish")
    project = cs.find_project(project_uid)
    job = project.create_external_job(workspace_uid, title=title)
    job.connect("particles", source[0], source[1])
    slots: list[Any] = ["alignments3D"]
    slots += [{"name": f"components_mode_{m}", "dtype": "components"} for m in mode_numbers]
    outputs = {"particles": results}
    outputs.update({name: _results(value, name)[0] for name, value in groups.items()})
    for name in outputs:
        job.add_output(
            "particle",
            name=name,
            slots=slots,
            passthrough="particles",
            title="DeepHEMNMA " + name.replace("_", " "),
        )
    with job.run():
        job.log(
            f"DeepHEMNMA: {len(results)} particles, modes {mode_numbers}, {len(groups)} group(s)"
        )
        for name, ds in outputs.items():
            out = job.alloc_output(name, ds["uid"])
            job.save_output(name, _fill(out, results, mode_numbers))
    return str(job.uid)

"""Checksum files as distributions publish them next to their cloud images.

A catalog entry may name, instead of a digest, the URL of the checksum file that lists its
image (``checksum_url``); the image's line is found by the file name in its ``source``. The
layouts read here, each as its publisher writes it:

- GNU coreutils (``sha256sum``/``sha512sum`` output): ``HEX  NAME`` (text mode, two
  spaces) or ``HEX *NAME`` (binary mode); a line starting with ``\\`` has an escaped name
  (``\\\\`` and ``\\n``). Debian's ``SHA512SUMS`` (cloud.debian.org/images/cloud/*/), Ubuntu's
  ``SHA256SUMS`` (cloud-images.ubuntu.com, binary mode). GNU coreutils manual, "md5sum
  invocation" (https://www.gnu.org/software/coreutils/manual/).
- BSD tagged (``sha256sum --tag``, BSD ``sha256``): ``SHA256 (NAME) = HEX``. AlmaLinux's and
  Rocky Linux's ``CHECKSUM`` files (repo.almalinux.org/almalinux/9/cloud/x86_64/images/,
  dl.rockylinux.org/pub/rocky/9/images/x86_64/), which also carry ``# NAME: N bytes``
  comment lines; AlmaLinux has written the digest in upper case.
- A bare digest, the whole file being one hex string: CernVM's ``IMAGE.sha256`` beside each
  image (cernvm/cernvm-micro, Makefile: ``sha256sum FILE | awk '{print $1}'``). It names no
  file, so it applies to the one image it sits beside.
- Any of these inside an OpenPGP clear-signed message (RFC 4880, section 7: armour header,
  dash-escaped text, signature block), as Fedora signs its ``CHECKSUM``. The signature is
  not checked here: the file comes from the URL the admin configured, over the same
  transport as the image.

The digest's length tells SHA-256 (64 hex digits) from SHA-512 (128) in GNU lines; other
algorithms (MD5, SHA-1) are not accepted. A name listed with two different digests of the
same algorithm is refused; listed with both SHA-256 and SHA-512, the SHA-512 is used.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from vmbatch.errors import ImageVerifyError
from vmbatch.images.download import Checksum

#: Digest length in hex digits -> algorithm name (hashlib's).
_ALGORITHMS = {64: "sha256", 128: "sha512"}
_BSD = re.compile(r"(?P<tag>[A-Za-z0-9-]+) \((?P<name>.+)\) ?= ?(?P<hex>[0-9A-Fa-f]+)")
_GNU = re.compile(r"(?P<hex>[0-9A-Fa-f]{64}|[0-9A-Fa-f]{128}) [ *](?P<name>.+)")
_HEX = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{128}")
#: Prefer the stronger digest when a file lists both.
_STRENGTH = {"sha256": 1, "sha512": 2}


def file_name(source: str) -> str:
    """The file name a checksum file lists for ``source`` (URL or path): its last path
    component, percent-decoded."""
    path = urlsplit(source).path if "://" in source else source
    return unquote(PurePosixPath(path).name)


def _unsign(lines: list[str]) -> list[str]:
    """The signed text of an OpenPGP clear-signed message; other text as it is."""
    if not lines or lines[0].strip() != "-----BEGIN PGP SIGNED MESSAGE-----":
        return lines
    body: list[str] = []
    in_headers = True
    for line in lines[1:]:
        if in_headers:
            in_headers = line.strip() != ""  # armour headers ("Hash: SHA256") end at a blank
            continue
        if line.strip() == "-----BEGIN PGP SIGNATURE-----":
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return body


def _unescape(name: str) -> str:
    """GNU's escaped file name (the line began with a backslash)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], name)


def _entries(text: str) -> tuple[list[tuple[str, str, str]], str | None]:
    """(name, algorithm, hex) of every line that lists a file, and a bare digest if the
    file is nothing but one."""
    lines = _unsign(text.splitlines())
    meaningful = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if len(meaningful) == 1 and _HEX.fullmatch(meaningful[0]):
        return [], meaningful[0]
    found = []
    for raw in meaningful:
        escaped = raw.startswith("\\")
        line = raw[1:] if escaped else raw
        if m := _BSD.fullmatch(line):
            algorithm = m["tag"].lower().replace("-", "")
            if _ALGORITHMS.get(len(m["hex"])) != algorithm:
                continue  # MD5, SHA-1, or a digest of the wrong length
            name = m["name"]
        elif m := _GNU.fullmatch(line):
            algorithm = _ALGORITHMS[len(m["hex"])]
            name = m["name"]
        else:
            continue  # comments, sizes, other algorithms, anything else
        if escaped:
            name = _unescape(name)
        found.append((name.removeprefix("./"), algorithm, m["hex"].lower()))
    return found, None


def find(text: str, name: str, *, image: str, url: str) -> Checksum:
    """The digest that checksum file ``text`` (fetched from ``url``) lists for ``name``.

    A listed name matches if it is ``name`` or ends in ``/name`` (``sha256sum`` run on a
    path). Raises :class:`ImageVerifyError` naming the URL and what to do when the file
    does not list the name, lists it twice with different digests, or lists nothing usable.
    """
    entries, bare = _entries(text)
    if bare is not None:
        return Checksum(_ALGORITHMS[len(bare)], bare.lower())
    listed = [
        (algorithm, hexdigest)
        for listed_name, algorithm, hexdigest in entries
        if listed_name == name or listed_name.endswith("/" + name)
    ]
    fix = (
        f"check [images.{image}].source and checksum_url: the checksum file must list the"
        " file the source names (a release may have replaced it upstream; point source at a"
        " file the checksum file lists, or give sha256/sha512 instead)"
    )
    if not listed:
        what = (
            f"lists {len(entries)} file(s) but not {name!r}"
            if entries
            else "has no SHA-256 or SHA-512 line at all"
        )
        raise ImageVerifyError(f"image {image!r}: the checksum file {url} {what}", hint=fix)
    best = max(_STRENGTH[a] for a, _ in listed)
    digests = {(a, h) for a, h in listed if _STRENGTH[a] == best}
    if len(digests) > 1:
        raise ImageVerifyError(
            f"image {image!r}: the checksum file {url} lists {name!r} with"
            f" {len(digests)} different digests",
            hint="the checksum file is inconsistent; give sha256/sha512 in the catalog instead",
        )
    algorithm, hexdigest = digests.pop()
    return Checksum(algorithm, hexdigest)

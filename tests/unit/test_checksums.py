"""Checksum files in the layouts distributions publish (vmbatch.images.checksums)."""

from __future__ import annotations

import pytest

from vmbatch.errors import ImageVerifyError
from vmbatch.images.checksums import file_name, find
from vmbatch.images.download import Checksum

A64, B64 = "a" * 64, "b" * 64
A128, B128 = "a" * 128, "b" * 128
URL = "https://mirror.example.invalid/images/SUMS"


def _find(text: str, name: str) -> Checksum:
    return find(text, name, image="img", url=URL)


def test_gnu_lines_text_and_binary_mode() -> None:
    # Debian's SHA512SUMS (text mode, two spaces) and Ubuntu's SHA256SUMS (binary, '*').
    debian = f"{B128}  debian-12-generic-amd64.qcow2\n{A128}  debian-12-genericcloud-amd64.qcow2\n"
    assert _find(debian, "debian-12-genericcloud-amd64.qcow2") == Checksum("sha512", A128)
    ubuntu = f"{A64} *noble-server-cloudimg-amd64.img\n{B64} *noble-server-cloudimg-arm64.img\n"
    assert _find(ubuntu, "noble-server-cloudimg-amd64.img") == Checksum("sha256", A64)


def test_bsd_tagged_lines_with_comments_and_upper_case() -> None:
    # Rocky's and AlmaLinux's CHECKSUM: size comments, BSD tags; Alma wrote upper case.
    rocky = (
        "# Rocky-9-GenericCloud-Base.latest.x86_64.qcow2: 645988352 bytes\n"
        f"SHA256 (Rocky-9-GenericCloud-Base.latest.x86_64.qcow2) = {A64}\n"
        f"SHA256 (Rocky-9-GenericCloud-LVM.latest.x86_64.qcow2) = {B64}\n"
    )
    assert _find(rocky, "Rocky-9-GenericCloud-Base.latest.x86_64.qcow2") == Checksum("sha256", A64)
    alma = f"SHA256 (AlmaLinux-9-GenericCloud-latest.x86_64.qcow2) = {A64.upper()}\n"
    assert _find(alma, "AlmaLinux-9-GenericCloud-latest.x86_64.qcow2") == Checksum("sha256", A64)
    assert _find(f"SHA512 (x.img) = {A128}\n", "x.img") == Checksum("sha512", A128)


def test_a_bare_digest_applies_to_the_image_beside_it() -> None:
    # CernVM's IMAGE.sha256: only the digest, no file name.
    assert _find(f"{A64}\n", "ucernvm-prod.hdd") == Checksum("sha256", A64)
    assert _find(f"\n  {A128.upper()}  \n", "anything") == Checksum("sha512", A128)


def test_clear_signed_checksum_file() -> None:
    head = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
    tail = "-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEE\n=abcd\n-----END PGP SIGNATURE-----\n"
    body = (
        f"# Fedora-Cloud.qcow2: 1 bytes\nSHA256 (Fedora-Cloud.qcow2) = {A64}\n"
        "- --- dash-escaped text line\n"
    )
    assert _find(head + body + tail, "Fedora-Cloud.qcow2") == Checksum("sha256", A64)
    # A clear-signed single digest is still a bare digest (the signature is not a line).
    assert _find(head + f"{B64}\n" + tail, "whatever.img") == Checksum("sha256", B64)


def test_paths_and_escaped_names() -> None:
    assert _find(f"{A64}  ./images/disk.qcow2\n", "disk.qcow2") == Checksum("sha256", A64)
    # GNU escapes a name with a backslash or newline and marks the line with a backslash.
    assert _find(f"\\{A64}  odd\\\\name.img\n", "odd\\name.img") == Checksum("sha256", A64)
    # "disk.qcow2" is not "other-disk.qcow2".
    with pytest.raises(ImageVerifyError):
        _find(f"{A64}  other-disk.qcow2\n", "disk.qcow2")


def test_the_stronger_digest_wins_and_conflicts_are_refused() -> None:
    both = f"SHA256 (x.img) = {A64}\nSHA512 (x.img) = {B128}\n"
    assert _find(both, "x.img") == Checksum("sha512", B128)
    same_twice = f"{A64}  x.img\nSHA256 (x.img) = {A64.upper()}\n"
    assert _find(same_twice, "x.img") == Checksum("sha256", A64)
    with pytest.raises(ImageVerifyError, match=r"lists 'x.img' with 2 different digests"):
        _find(f"{A64}  x.img\n{B64}  x.img\n", "x.img")


def test_a_missing_line_names_the_url_and_the_fix() -> None:
    with pytest.raises(ImageVerifyError) as info:
        _find(f"{A64}  debian-12-generic-amd64.qcow2\n", "debian-12-genericcloud-amd64.qcow2")
    assert str(info.value).startswith(
        f"image 'img': the checksum file {URL} lists 1 file(s) but not"
        " 'debian-12-genericcloud-amd64.qcow2'"
    )
    assert "[images.img].source and checksum_url" in (info.value.hint or "")
    # MD5 and SHA-1 lines are not accepted; a file of only those lists nothing usable.
    weak = f"MD5 (x.img) = {'a' * 32}\nSHA1 (x.img) = {'a' * 40}\n{'a' * 40}  x.img\n"
    with pytest.raises(ImageVerifyError, match="has no SHA-256 or SHA-512 line at all"):
        _find(weak, "x.img")
    with pytest.raises(ImageVerifyError, match="has no SHA-256 or SHA-512 line"):
        _find("<html>404 Not Found</html>\n", "x.img")


def test_file_name_of_a_source() -> None:
    assert file_name("https://h/a/b/disk%20one.qcow2") == "disk one.qcow2"
    assert file_name("https://h/a/b/disk.qcow2?x=1") == "disk.qcow2"
    assert file_name("file:///var/lib/vmbatch/images/x.img") == "x.img"
    assert file_name("/srv/images/x.img") == "x.img"

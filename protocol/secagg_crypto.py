"""The cryptographic steps of SecAgg+, all from Flower's building blocks and ``cryptography``.

Key agreement (ECDH on P-384 + HKDF-SHA256) and authenticated encryption of shares (Fernet) come
from ``flwr.common.secure_aggregation.crypto.symmetric_encryption`` and Flower's key
(de)serialisation; Shamir secret sharing from ``flwr.common.secure_aggregation.crypto.shamir``;
the share plaintext layout from ``secaggplus_utils``. This follows Bonawitz et al. (CCS 2017)
and Bell et al. (CCS 2020): per node two key pairs (``c`` to encrypt shares, ``s`` for pairwise
masks) and a self-mask seed ``b``.

Masks are expanded with AES-256 in counter mode (``cryptography``) from a 32-byte seed: the
standard PRG instantiation. Flower's ``pseudo_rand_gen`` is not used because it folds the seed to
32 bits by XOR and draws from MT19937, so a mask has at most 2**32 values (two seeds with equal
XOR folds give equal masks), and it cannot draw below 2**64.
"""

from __future__ import annotations

import base64
import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

SEED_BYTES = 32


def new_key_pair() -> tuple[bytes, bytes]:
    """``(private PEM, public PEM)`` of a fresh P-384 key pair."""
    sk, pk = generate_key_pairs()
    return private_key_to_bytes(sk), public_key_to_bytes(pk)


def public_of(private_pem: bytes) -> bytes:
    return public_key_to_bytes(bytes_to_private_key(private_pem).public_key())


def is_public_key(data: object) -> bool:
    """Whether ``data`` is a PEM public key of the kind :func:`new_key_pair` makes (P-384)."""
    if not isinstance(data, bytes):
        return False
    try:
        key = bytes_to_public_key(data)
    except Exception:  # noqa: BLE001 - any parse failure means "not a key"
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def commit(seed: bytes) -> bytes:
    """A binding commitment to a self-mask seed (SHA-256; the seed is 32 random bytes)."""
    return hashlib.sha256(b"fedlora-secagg-b|" + seed).digest()


def agree(private_pem: bytes, public_pem: bytes) -> bytes:
    """The 32-byte key both ends derive (ECDH + HKDF-SHA256), as Flower derives it."""
    fernet_key = generate_shared_key(
        bytes_to_private_key(private_pem), bytes_to_public_key(public_pem)
    )
    return base64.urlsafe_b64decode(fernet_key)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def mask(seed: bytes, size: int, modulus_bits: int) -> np.ndarray:
    """``size`` uniform integers modulo ``2**modulus_bits`` (uint64) expanded from ``seed``.

    AES-256-CTR keystream with a zero nonce: each seed (a fresh self-mask seed, or a pairwise key
    from fresh per-round key pairs) expands one mask only, so the nonce never repeats under a key.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    out = np.frombuffer(stream.update(bytes(8 * size)) + stream.finalize(), dtype="<u8")
    out = out.astype(np.uint64)  # a writable native-order copy
    if modulus_bits < 64:
        np.bitwise_and(out, np.uint64(2**modulus_bits - 1), out=out)
    return out


def pair_sign(own: int, other: int) -> int:
    """The sign node ``own`` gives the mask it shares with ``other`` (the pair's masks cancel)."""
    return 1 if own > other else -1


def add_mask(acc: np.ndarray, seed: bytes, modulus_bits: int, sign: int) -> None:
    """``acc += sign * mask(seed)`` in place, modulo ``2**(8 * acc.itemsize)``.

    ``acc`` is an unsigned integer vector at least ``modulus_bits`` wide (uint64, or uint16 /
    uint32 for a narrow wire): its arithmetic wraps modulo a multiple of ``2**modulus_bits``, so
    reducing to the modulus at the end gives the sum modulo ``2**modulus_bits``.
    """
    if acc.dtype.kind != "u" or 8 * acc.itemsize < modulus_bits:
        raise ValueError(f"masks modulo 2**{modulus_bits} need unsigned integers that wide")
    m = mask(seed, acc.size, modulus_bits)
    if m.dtype != acc.dtype:
        m = m.astype(acc.dtype)  # exact: every mask value is below 2**modulus_bits
    (np.add if sign > 0 else np.subtract)(acc, m, out=acc)


def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of ``secret`` (Flower's shamir); share ``i`` carries its index."""
    return create_shares(secret, threshold, num)


def join_shares(shares: list[bytes]) -> bytes:
    return combine_shares(shares)


def seal_shares(
    c_sk: bytes, dst_c_pk: bytes, src: int, dst: int, b_share: bytes, sk_share: bytes
) -> bytes:
    """Encrypt ``(src, dst, b share, s_sk share)`` for ``dst`` (Fernet under the c-agreement)."""
    key = base64.urlsafe_b64encode(agree(c_sk, dst_c_pk))
    return encrypt(key, share_keys_plaintext_concat(src, dst, b_share, sk_share))


def open_shares(c_sk: bytes, src_c_pk: bytes, ciphertext: bytes) -> tuple[int, int, bytes, bytes]:
    """Decrypt and authenticate what :func:`seal_shares` made: ``(src, dst, b, s_sk)`` shares."""
    key = base64.urlsafe_b64encode(agree(c_sk, src_c_pk))
    return share_keys_plaintext_separate(decrypt(key, ciphertext))


__all__ = [
    "SEED_BYTES",
    "add_mask",
    "agree",
    "commit",
    "is_public_key",
    "join_shares",
    "mask",
    "new_key_pair",
    "new_seed",
    "open_shares",
    "pair_sign",
    "public_of",
    "seal_shares",
    "split_secret",
]

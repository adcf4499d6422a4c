"""
The vendor public keys licenses are verified against: C{(kid, issuer, base64 of the 32 raw
Ed25519 public key bytes)}. Public keys only; the private keys never enter this repository.

Rotation: make a new pair with C{packaging/license-tool keygen --kid NEW --dir DIR} on the
signing machine, add its entry here (keep the old one while licenses signed with it are still in
use), release, and sign new licenses with the new key. Removing an entry revokes every license
signed with that key.
"""

from __future__ import annotations

#: kid, issuer, public key (base64). The first entry is the current signing key.
BUILTIN_KEYS: tuple[tuple[str, str, str], ...] = (
    ("rivano-2026-1", "rivano", "4LJFGklCYaZkmC5z+CTkYfSTMaaoKGSnvzTBrwpre3A="),
)

"""Independent checks of walhook's Standard Webhooks v1a keys and signatures, with the
`cryptography` package (OpenSSL's ed25519), run by tests/delivery/formats.rs.

  ed25519_check.py pair WHSK WHPK
      The secret key's public half is WHPK, and a signature made with WHSK verifies
      with WHPK (and not over other content). Prints "pair ok"; exits 1 otherwise.

  ed25519_check.py verify WHPK < deliveries
      One JSON object a line: {"id", "timestamp", "signature", "body_b64"} (the
      webhook-id, webhook-timestamp and webhook-signature headers and the raw body).
      Prints one line per delivery: "ok" when one of the space-separated "v1a,<base64>"
      signatures verifies over "{id}.{timestamp}.{body}" with WHPK, else "bad".
"""

import base64
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def decode(key, prefix):
    if not key.startswith(prefix):
        sys.exit(f"not a {prefix} key")
    raw = base64.b64decode(key[len(prefix):], validate=True)
    if len(raw) != 32:
        sys.exit(f"{prefix} key decodes to {len(raw)} bytes, not 32")
    return raw


def public_key(whpk):
    return Ed25519PublicKey.from_public_bytes(decode(whpk, "whpk_"))


def verifies(public, content, signature):
    try:
        public.verify(signature, content)
        return True
    except InvalidSignature:
        return False


def pair(whsk, whpk):
    secret = Ed25519PrivateKey.from_private_bytes(decode(whsk, "whsk_"))
    derived = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if derived != decode(whpk, "whpk_"):
        sys.exit("the public key is not the secret key's")
    public = public_key(whpk)
    content = b"msg_1.1700000000.{\"n\":1}"
    signature = secret.sign(content)
    if not verifies(public, content, signature):
        sys.exit("a signature made with the secret key does not verify")
    if verifies(public, content + b" ", signature):
        sys.exit("a signature verifies over other content")
    print("pair ok")


def verify(whpk):
    public = public_key(whpk)
    for line in sys.stdin:
        if not line.strip():
            continue
        d = json.loads(line)
        content = f"{d['id']}.{d['timestamp']}.".encode() + base64.b64decode(d["body_b64"])
        ok = False
        for part in d["signature"].split(" "):
            version, _, b64 = part.partition(",")
            if version == "v1a" and verifies(public, content, base64.b64decode(b64)):
                ok = True
        print("ok" if ok else "bad")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "pair":
        pair(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "verify":
        verify(sys.argv[2])
    else:
        sys.exit(__doc__)

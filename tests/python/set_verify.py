"""Independent check of walhook's Security Event Tokens (format = "set") with PyJWT
(`import jwt`, Debian's python3-jwt; EdDSA through the `cryptography` package), run by
tests/delivery/set.rs.

  set_verify.py JWKS_URL ISSUER AUDIENCE < tokens
      Fetches the JWK Set from JWKS_URL over HTTP, then reads one token a line and
      prints one line per token: a JSON object {"kid", "typ", "alg", "claims"} when
      the token verifies (EdDSA, with the JWKS key its header's kid names, issuer and
      audience checked, iss, aud, iat and jti required), else "bad: " and the reason.
"""

import json
import sys
import urllib.request

import jwt


def main(url, issuer, audience):
    with urllib.request.urlopen(url, timeout=10) as response:
        if response.headers.get_content_type() != "application/json":
            sys.exit(f"JWKS content type {response.headers.get_content_type()}")
        jwks = json.load(response)
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}
    for line in sys.stdin:
        token = line.strip()
        if not token:
            continue
        try:
            header = jwt.get_unverified_header(token)
            key = keys.get(header.get("kid"))
            if key is None:
                raise LookupError(f"no key {header.get('kid')!r} in the JWKS")
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["EdDSA"],
                audience=audience,
                issuer=issuer,
                options={"require": ["iss", "aud", "iat", "jti"]},
            )
            print(
                json.dumps(
                    {
                        "kid": header["kid"],
                        "typ": header.get("typ"),
                        "alg": header.get("alg"),
                        "claims": claims,
                    }
                )
            )
        except Exception as e:  # every failure is a verdict, not a crash
            print(f"bad: {type(e).__name__}: {e}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])

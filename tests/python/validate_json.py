"""Validates JSON documents against a JSON Schema with the `jsonschema` package (and its
format checker, for the formats whose checkers are installed), run by
tests/delivery/formats.rs.

  validate_json.py SCHEMA < documents
      One JSON document a line; prints one line per document: "valid", or "invalid: "
      and the first error.
"""

import json
import sys

import jsonschema


def main(schema_path):
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    for line in sys.stdin:
        if not line.strip():
            continue
        errors = sorted(validator.iter_errors(json.loads(line)), key=str)
        print("valid" if not errors else "invalid: " + errors[0].message)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

"""What the evaluation data modules share: records readable by field name, and responses matched to records."""

from __future__ import annotations

from collections.abc import Mapping


class FieldAccess:
    """Field access by name on a dataclass record, as on its decoded JSON line (``record["prompt"]``)."""

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


def responses_for(records: list, responses, key: str, error: type[Exception]) -> list[str]:
    """One response string per record, in order: `responses` is a sequence in record order or a mapping from each
    record's `key` field to its response; `error` (naming what is missing or wrong) otherwise."""
    if isinstance(responses, Mapping):
        missing = [getattr(r, key) for r in records if getattr(r, key) not in responses]
        if missing:
            raise error(f"responses: no response for {key}(s) {missing[:10]}"
                        f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(records)})")
        out = [responses[getattr(r, key)] for r in records]
    else:
        out = list(responses)
        if len(out) != len(records):
            raise error(f"responses: {len(out)} responses for {len(records)} prompts; give one per prompt, in order, "
                        f"or a mapping {key} -> response")
    for r, resp in zip(records, out):
        if not isinstance(resp, str):
            raise error(f"responses: the response to {key} {getattr(r, key)!r} ({r.source}) is "
                        f"{type(resp).__name__}, not a string")
    return out

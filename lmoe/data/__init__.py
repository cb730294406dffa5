"""What a model reads: records from files and the built-in data, chat encoding into token ids with labels,
multiple-choice questions, the offline benchmarks and the hash splits.

`lmoe.data.NAME` for a name of the one module this package once was still works (with a DeprecationWarning):
import from lmoe.data.encoding, lmoe.data.records or lmoe.data.builtin instead."""


def __getattr__(name: str):
    from .._moved import data_attribute
    return data_attribute(name)

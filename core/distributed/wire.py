"""A compact binary encoding for what rank 0 sends the other ranks every step."""

from __future__ import annotations

from collections.abc import Iterable


class Writer:
    """Appends unsigned varints and length-prefixed strings and lists to a byte buffer."""

    def __init__(self) -> None:
        self.data = bytearray()

    def uint(self, value: int) -> Writer:
        if value < 0:
            raise ValueError(f"cannot encode {value}: unsigned values only")
        while value >= 0x80:
            self.data.append(value & 0x7F | 0x80)
            value >>= 7
        self.data.append(value)
        return self

    def text(self, value: str) -> Writer:
        raw = value.encode()
        self.uint(len(raw))
        self.data += raw
        return self

    def uints(self, values: Iterable[int]) -> Writer:
        values = list(values)
        self.uint(len(values))
        for value in values:
            self.uint(value)
        return self

    def texts(self, values: Iterable[str]) -> Writer:
        values = list(values)
        self.uint(len(values))
        for value in values:
            self.text(value)
        return self

    def raw(self, value: bytes) -> Writer:
        self.uint(len(value))
        self.data += value
        return self


class Reader:
    """Reads back, in the same order, what a :class:`Writer` wrote."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def uint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def text(self) -> str:
        return bytes(self.raw()).decode()

    def uints(self) -> tuple[int, ...]:
        return tuple(self.uint() for _ in range(self.uint()))

    def texts(self) -> tuple[str, ...]:
        return tuple(self.text() for _ in range(self.uint()))

    def raw(self) -> memoryview:
        length = self.uint()
        value = self.data[self.at : self.at + length]
        if len(value) != length:
            raise ValueError("truncated message")
        self.at += length
        return value

"""Value spellings both backends share: MAC masks, number ranges, TCP flags, comments (pure).

Each backend writes these into its own syntax (nft expressions, ebtables/iptables options); what
is the same for both lives here once. IP addresses are not: nft clears host bits, ebtables and
iptables take the address as the filter wrote it.
"""

from __future__ import annotations

from ..errors import UnsupportedError

# TCP header flag bits in header order, with their names (nft writes them lower case).
TCP_FLAGS = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"))


def mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def mac_text(value: int) -> str:
    """A 48-bit number as a lower-case MAC address."""
    return ":".join(f"{(value >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


def mac_mask(prefix: int) -> str:
    """The MAC address mask of a prefix length (24 → ``ff:ff:ff:00:00:00``)."""
    if not 0 <= prefix <= 48:
        raise UnsupportedError(f"MAC mask length {prefix} out of range")
    return mac_text(((1 << prefix) - 1) << (48 - prefix))


def range_text(low: int, high: int, sep: str) -> str:
    """``low`` alone, or ``low<sep>high``."""
    return str(low) if low == high else f"{low}{sep}{high}"


def tcp_flag_names(bits: int) -> list[str]:
    """The names of the set flag bits, in header order."""
    return [name for bit, name in TCP_FLAGS if bits & bit]


def clean_comment(text: str, max_bytes: int) -> str:
    """Comment text a line-based input can carry: control characters become spaces, and the text
    is cut to ``max_bytes`` of UTF-8 at a character boundary."""
    text = "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        text = data[:max_bytes].decode("utf-8", errors="ignore")
    return text

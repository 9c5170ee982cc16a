"""``simulate``: would this packet pass the rules of a port? (offline, or ``--kernel``)

Layers, each in its own module:

==================  ==========================================================================
``packet``          the words an operator writes (``out tcp dstportstart=22``) -> :class:`Packet`
``frames``          :class:`Packet` -> the bytes of a real Ethernet frame (for ``--kernel``)
``conds``           an IR condition -> a predicate over packets
``conntrack``       the connection tracker's view of a conversation (NEW/ESTABLISHED/...)
``evaluate``        a packet through the stages of a port's ruleset -> verdicts and the rules
                    that decided them (pure, no root, no kernel)
``explain``         results -> text for operators, or JSON for tools
``kernel``          ``--kernel``: the same packets through real rules in a throw-away network
                    namespace, with the deciding rules read from the kernel's own trace
==================  ==========================================================================

Everything but ``kernel`` (and the ``inject`` helper it runs inside the namespace) is pure.
"""

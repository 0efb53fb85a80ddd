"""The search strategies by order name (``--order``); ``--layout`` picks a fixed layout instead. A new order is one
file with a strategy (see ``strategy``) and one line here."""

from __future__ import annotations

from kvtool.errors import KvtoolError
from kvtool.formats.recipe import SearchSettings
from kvtool.search.best_first import BestFirst
from kvtool.search.layouts import LAYOUTS, Layout
from kvtool.search.orders import Greedy
from kvtool.search.strategy import Strategy

ORDERS: dict[str, type] = {
    "best-first": BestFirst,
    "local": Greedy,
    "dissimilar": Greedy,
    "similar": Greedy,
    "random": Greedy,
}


def strategy_for(s: SearchSettings) -> Strategy:
    """The strategy ``s`` asks for: its layout, or its order."""
    if s.layout is not None:
        if s.layout not in LAYOUTS:
            raise KvtoolError(f"unknown layout {s.layout!r}; use one of {', '.join(LAYOUTS)}")
        return Layout.from_settings(s)
    if s.order not in ORDERS:
        raise KvtoolError(f"unknown order {s.order!r}; use one of {', '.join(ORDERS)}")
    return ORDERS[s.order].from_settings(s)

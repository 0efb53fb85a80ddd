"""Finding a sharing map: the search driver (``search``), its orders and layouts, candidate scoring, local error
scores, and the side-by-side comparison of every order and layout."""

from kvtool.search.search import SearchResult, search

__all__ = ["SearchResult", "search"]

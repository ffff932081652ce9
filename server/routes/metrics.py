"""GET /metrics: the engine's metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Counters, histograms and gauges of the engine, for Prometheus to scrape.

    Like /health, it needs no API key (scrapers rarely send one): it reveals model names,
    token counts and latencies, but no request content.
    """
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

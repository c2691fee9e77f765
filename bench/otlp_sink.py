"""An OTLP/HTTP traces endpoint that counts what it is sent: the collector of `tracing.py`.

    python bench/otlp_sink.py --port 4318

`POST /v1/traces` takes a protobuf `ExportTraceServiceRequest`, parses it as a collector
would, and counts its spans by name; `GET /spans` answers the counts as JSON.
"""

from __future__ import annotations

import argparse
from collections import Counter

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ANSWER = ExportTraceServiceResponse().SerializeToString()


def make_app() -> web.Application:
    spans: Counter[str] = Counter()
    exports = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal exports
        export = ExportTraceServiceRequest.FromString(await request.read())
        exports += 1
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                spans.update(span.name for span in scope.spans)
        return web.Response(body=ANSWER, content_type="application/x-protobuf")

    async def counts(_: web.Request) -> web.Response:
        return web.json_response({"exports": exports, "spans": dict(spans)})

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    app.router.add_get("/spans", counts)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

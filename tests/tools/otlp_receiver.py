"""An OTLP trace receiver for the tests: gRPC (TraceService/Export) and HTTP/protobuf
(POST /v1/traces), decoded with opentelemetry-proto from PyPI (the real wire format, as
vLLM's own tracing test does). Each span received is written as one JSON line.

    python otlp_receiver.py GRPC_PORT HTTP_PORT OUT.jsonl
"""

import http.server
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

grpc_port, http_port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = open(out_path, "a", buffering=1)
lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def record(req, via):
    for rs in req.resource_spans:
        resource = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for sp in ss.spans:
                line = {
                    "via": via,
                    "service": resource.get("service.name", ""),
                    "resource": resource,
                    "scope": ss.scope.name,
                    "trace_id": sp.trace_id.hex(),
                    "span_id": sp.span_id.hex(),
                    "parent_span_id": sp.parent_span_id.hex(),
                    "name": sp.name,
                    "kind": sp.kind,
                    "start_ns": sp.start_time_unix_nano,
                    "end_ns": sp.end_time_unix_nano,
                    "attributes": {a.key: value(a.value) for a in sp.attributes},
                    "status": sp.status.code,
                }
                with lock:
                    out.write(json.dumps(line) + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        record(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class Http(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(400)
            self.end_headers()
            return
        record(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
server.add_insecure_port(f"127.0.0.1:{grpc_port}")
server.start()
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Http)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
print("ready", flush=True)
server.wait_for_termination()

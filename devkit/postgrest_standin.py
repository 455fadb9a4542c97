"""A PostgREST-protocol stand-in for the tests and the benchmarks (PostgREST
itself cannot be installed here). No service ever uses it.

Serves `POST /rest/v1/rpc/<function>` the way PostgREST does: checks the
`apikey` header and the JWT in `Authorization`, then in ONE transaction
switches to the JWT's role, applies that role's settings (PostgREST's
"impersonated role settings", e.g. its statement_timeout), exposes the
request headers and JWT claims as `request.*` settings, runs the
`db-pre-request` function, and calls the function with named arguments.
Errors come back as PostgREST's JSON (`code`, `message`, `details`, `hint`)
with its SQLSTATE -> HTTP status mapping and `Proxy-Status` header.

Like PostgREST, it does NOT cancel a running query when the HTTP client goes
away: the handler thread runs the statement to its end. Only the
statement_timeout set by the pre-request function stops it early.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

APP_NAME = "postgrest_standin"
ROLES = {"anon", "authenticated", "service_role"}
PRE_REQUEST = "apply_request_timeout"
_FUNCTION = re.compile(r"/rest/v1/rpc/([a-z_][a-z0-9_]*)")


def http_status(sqlstate: str, role: str) -> int:
    """PostgREST's SQLSTATE -> HTTP status table."""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "P0001": 400,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
        "53400": 500,
        "57P01": 503,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "42501":
        return 401 if role == "anon" else 403
    prefixes = [
        ("08", 503),
        ("09", 500),
        ("0L", 403),
        ("0P", 403),
        ("25", 500),
        ("28", 403),
        ("2D", 500),
        ("38", 500),
        ("39", 500),
        ("3B", 500),
        ("40", 500),
        ("53", 503),
        ("54", 500),
        ("55", 500),
        ("57", 500),
        ("58", 500),
        ("F0", 500),
        ("HV", 500),
        ("P0", 500),
        ("XX", 500),
    ]
    for prefix, status in prefixes:
        if sqlstate.startswith(prefix):
            return status
    return 400


class PostgrestStandin:
    def __init__(self, database_url: str, jwt_secret: str, *, pool_size: int = 8) -> None:
        self.jwt_secret = jwt_secret
        self.pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=pool_size,
            kwargs={"application_name": APP_NAME, "autocommit": True},
            open=False,
        )
        self.requests: list[dict[str, Any]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # As PostgREST's server does: headers and body go out at once, not
            # held back by Nagle's algorithm against the client's delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/rest/v1":
                    self._send(200, {"swagger": "2.0"})
                else:
                    self._send(
                        404,
                        {
                            "code": "PGRST125",
                            "message": "Invalid path",
                            "details": None,
                            "hint": None,
                        },
                    )

            def do_POST(self) -> None:
                standin.handle_rpc(self)

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                standin.respond(self, status, body, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> PostgrestStandin:
        self.pool.open(wait=True, timeout=10)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.close()

    def token(self, role: str) -> str:
        return self.token_for(role, self.jwt_secret)

    @staticmethod
    def token_for(role: str, secret: str) -> str:
        return jwt.encode({"role": role, "iss": "supabase-standin"}, secret, algorithm="HS256")

    # -- protocol ------------------------------------------------------------

    def respond(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json; charset=utf-8")
            handler.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up; PostgREST would just log it

    def error(
        self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str, **extra: Any
    ) -> None:
        body = {
            "code": code,
            "message": message,
            "details": extra.get("details"),
            "hint": extra.get("hint"),
        }
        self.respond(handler, status, body, {"Proxy-Status": f"PostgREST; error={code}"})

    def authenticate(self, handler: BaseHTTPRequestHandler) -> dict[str, Any] | None:
        if not handler.headers.get("apikey"):
            self.error(handler, 401, "PGRST301", "No API key found in request")
            return None
        scheme, _, token = (handler.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            token = handler.headers["apikey"]
        try:
            claims: dict[str, Any] = jwt.decode(token, self.jwt_secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            self.error(handler, 401, "PGRST301", "JWT could not be decoded")
            return None
        if claims.get("role") not in ROLES:
            self.error(handler, 401, "PGRST301", "JWT role is not a known database role")
            return None
        return claims

    def handle_rpc(self, handler: BaseHTTPRequestHandler) -> None:
        match = _FUNCTION.fullmatch(handler.path)
        if match is None:
            self.error(handler, 404, "PGRST125", "Invalid path specified in request URL")
            return
        claims = self.authenticate(handler)
        if claims is None:
            return
        length = int(handler.headers.get("Content-Length") or 0)
        try:
            args = json.loads(handler.rfile.read(length) or b"{}")
            if not isinstance(args, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as exc:
            self.error(handler, 400, "PGRST102", f"Invalid request body: {exc}")
            return
        headers = {key.lower(): value for key, value in handler.headers.items()}
        self.requests.append({"function": match.group(1), "headers": headers, "args": args})
        role = str(claims["role"])
        try:
            result = self.run(match.group(1), args, role, headers, claims, handler.path)
        except psycopg.Error as exc:
            diag = exc.diag
            sqlstate = exc.sqlstate or "XX000"
            if sqlstate == "42883":
                self.error(
                    handler, 404, "PGRST202", f"Could not find the function {match.group(1)}"
                )
                return
            self.error(
                handler,
                http_status(sqlstate, role),
                sqlstate,
                diag.message_primary or str(exc),
                details=diag.message_detail,
                hint=diag.message_hint,
            )
            return
        self.respond(handler, 200, result)

    def run(
        self,
        function: str,
        args: dict[str, Any],
        role: str,
        headers: dict[str, str],
        claims: dict[str, Any],
        path: str,
    ) -> Any:
        call = sql.SQL("SELECT to_jsonb({}({}))").format(
            sql.Identifier(function),
            sql.SQL(", ").join(
                sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in args
            ),
        )
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT set_config('role', %s, true)", (role,))
            # PostgREST applies the impersonated role's own settings per transaction.
            settings = conn.execute(
                "SELECT unnest(s.setconfig) FROM pg_db_role_setting s"
                " JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = %s AND s.setdatabase = 0",
                (role,),
            ).fetchall()
            for (setting,) in settings:
                name, _, value = setting.partition("=")
                conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            conn.execute(
                "SELECT set_config('request.method', 'POST', true), set_config('request.path', %s, true),"
                " set_config('request.headers', %s, true), set_config('request.jwt.claims', %s, true)",
                (path, json.dumps(headers), json.dumps(claims)),
            )
            conn.execute(sql.SQL("SELECT {}()").format(sql.Identifier(PRE_REQUEST)))
            row = conn.execute(call, args).fetchone()
            return row[0] if row else None

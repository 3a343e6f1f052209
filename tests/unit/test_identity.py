"""Identity: Unix peers and bearer tokens to roles and tenants, the 401 rules, reloads."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
from typing import Any

import pytest
from starlette.datastructures import State
from starlette.requests import Request

from scratchd.api.errors import error_response, refusal
from scratchd.api.identity import ANONYMOUS, PEER_KEY, USER_CACHE_SECONDS, Identities, Role, authenticate
from scratchd.config import Config, parse_config
from scratchd.errors import Refused

TENANT_TOKEN = "t-" + "a" * 40
VIEWER_TOKEN = "v-" + "b" * 40
ADMIN_TOKEN = "a-" + "c" * 40
NO_SUCH_UID = 2**31 - 7


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def config(**server: Any) -> Config:
    return parse_config(
        {
            "server": server,
            "token": [
                {"name": "ci", "sha256": sha(TENANT_TOKEN).upper(), "role": "tenant", "tenant": "ci"},
                {"name": "grafana", "sha256": sha(VIEWER_TOKEN), "role": "viewer"},
                {"name": "ops", "sha256": sha(ADMIN_TOKEN), "role": "admin"},
            ],
        }
    )


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this host has no user 'nobody'")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class App:
    def __init__(self, identities: Identities) -> None:
        self.state = State({"identities": identities})


def request(app: App, authorization: str | None = None, peer: tuple[int, int, int] | None = None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "app": app,
        "headers": [(b"authorization", authorization.encode("latin-1"))] if authorization else [],
    }
    if peer is not None:
        scope[PEER_KEY] = peer
    return Request(scope)


# -- tokens -----------------------------------------------------------------------------------


def test_each_token_names_its_role_and_tenant():
    identities = Identities(config())
    tenant = identities.from_token(TENANT_TOKEN)
    assert tenant is not None and tenant.role is Role.TENANT and not tenant.sees_all()
    # A TCP tenant has no Unix user: its directories belong to the daemon's user.
    assert tenant.tenant is not None
    assert (tenant.tenant.name, tenant.tenant.uid, tenant.tenant.gid) == ("ci", os.geteuid(), os.getegid())
    assert not tenant.tenant.may_bind_any_pid
    viewer = identities.from_token(VIEWER_TOKEN)
    assert viewer is not None and viewer.role is Role.VIEWER and viewer.tenant is None and viewer.sees_all()
    admin = identities.from_token(ADMIN_TOKEN)
    assert admin is not None and admin.role is Role.ADMIN and admin.tenant is None


@pytest.mark.parametrize(
    "token", ["", "wrong", TENANT_TOKEN + "x", TENANT_TOKEN[:-1], sha(TENANT_TOKEN), TENANT_TOKEN.upper()]
)
def test_anything_but_the_token_itself_is_refused(token):
    assert Identities(config()).from_token(token) is None


# -- Unix peers -------------------------------------------------------------------------------


def test_root_is_always_admin_and_may_bind_any_pid():
    caller = Identities(config(admins=[])).from_peer(0, 0)
    assert caller.role is Role.ADMIN
    assert caller.tenant is not None and caller.tenant.name == pwd.getpwuid(0).pw_name
    assert caller.tenant.may_bind_any_pid


def test_a_user_is_a_tenant_named_by_the_user_database():
    user = nobody()
    caller = Identities(config(admins=["root"])).from_peer(user.pw_uid, user.pw_gid)
    assert caller.role is Role.TENANT and not caller.sees_all()
    assert caller.tenant is not None
    assert (caller.tenant.name, caller.tenant.uid, caller.tenant.gid) == (
        user.pw_name,
        user.pw_uid,
        user.pw_gid,
    )
    assert not caller.tenant.may_bind_any_pid


def test_admins_by_name_by_primary_group_and_by_the_peers_group():
    user = nobody()
    group = grp.getgrgid(user.pw_gid).gr_name
    assert Identities(config(admins=[user.pw_name])).from_peer(user.pw_uid, user.pw_gid).role is Role.ADMIN
    assert Identities(config(admins=["@" + group])).from_peer(user.pw_uid, user.pw_gid).role is Role.ADMIN
    # The kernel says the peer runs with group 0 (its effective gid): that group counts too.
    root_group = grp.getgrgid(0).gr_name
    assert Identities(config(admins=["@" + root_group])).from_peer(user.pw_uid, 0).role is Role.ADMIN
    assert (
        Identities(config(admins=["@" + root_group])).from_peer(user.pw_uid, user.pw_gid).role is Role.TENANT
    )
    # A group with the user's name is not the user.
    assert (
        Identities(config(admins=["@" + user.pw_name])).from_peer(user.pw_uid, user.pw_gid).role
        is Role.TENANT
    )


def test_a_uid_without_passwd_entry_is_named_by_its_number():
    caller = Identities(config()).from_peer(NO_SUCH_UID, 12345)
    assert caller.role is Role.TENANT
    assert caller.tenant is not None
    assert (caller.tenant.name, caller.tenant.uid, caller.tenant.gid) == (
        str(NO_SUCH_UID),
        NO_SUCH_UID,
        12345,
    )


def test_users_are_looked_up_again_after_the_cache_time():
    clock = Clock()
    identities = Identities(config(), clock=clock)
    first = identities.from_peer(NO_SUCH_UID, 1)
    clock.now += USER_CACHE_SECONDS - 1
    assert identities.from_peer(NO_SUCH_UID, 1) is first
    assert identities.from_peer(NO_SUCH_UID, 2) is not first  # another effective group: looked up on its own
    clock.now += 2
    again = identities.from_peer(NO_SUCH_UID, 1)
    assert again == first and again is not first


def test_unknown_admins_are_listed():
    user = nobody()
    identities = Identities(config(admins=["root", user.pw_name, "no-such-user-x", "@no-such-group-x"]))
    assert identities.unknown_admins() == ["@no-such-group-x", "no-such-user-x"]


# -- authenticate: the 401 rules ------------------------------------------------------------


def test_a_unix_peer_is_its_user_whatever_it_sends():
    user = nobody()
    app = App(Identities(config()))
    peer = (1, user.pw_uid, user.pw_gid)
    for header in (f"Bearer {ADMIN_TOKEN}", "Bearer nonsense"):
        caller = authenticate(request(app, header, peer=peer), anonymous_ok=False)
        assert caller.role is Role.TENANT and caller.tenant is not None and caller.tenant.uid == user.pw_uid


@pytest.mark.parametrize(
    "header", [f"Bearer {VIEWER_TOKEN}", f"bearer {VIEWER_TOKEN}", f"BEARER   {VIEWER_TOKEN}  "]
)
def test_bearer_scheme_is_case_insensitive(header):
    app = App(Identities(config()))
    assert authenticate(request(app, header), anonymous_ok=False).role is Role.VIEWER


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Bearer wrong", f"Basic {VIEWER_TOKEN}", VIEWER_TOKEN, f"Token {VIEWER_TOKEN}"],
)
@pytest.mark.parametrize("anonymous", ["none", "viewer"])
def test_a_bad_authorization_is_401_even_where_anonymous_reads_are_allowed(header, anonymous):
    app = App(Identities(config(anonymous=anonymous)))
    with pytest.raises(Refused) as refused:
        authenticate(request(app, header), anonymous_ok=True)
    assert (refused.value.status, refused.value.code) == (401, "unauthenticated")


def test_no_token_is_401_unless_anonymous_viewers_may_read():
    app = App(Identities(config(anonymous="none")))
    for anonymous_ok in (True, False):
        with pytest.raises(Refused) as refused:
            authenticate(request(app), anonymous_ok=anonymous_ok)
        assert refused.value.status == 401
    app = App(Identities(config(anonymous="viewer")))
    assert authenticate(request(app), anonymous_ok=True) is ANONYMOUS
    with pytest.raises(Refused) as refused:
        authenticate(request(app), anonymous_ok=False)  # a change: never anonymous
    assert refused.value.status == 401


def test_the_apps_current_identities_decide():
    # app.py replaces app.state.identities on every config reload; nothing here may hold on to the old ones.
    app = App(Identities(config(anonymous="none")))
    assert authenticate(request(app, f"Bearer {TENANT_TOKEN}"), anonymous_ok=False).role is Role.TENANT
    new_token = "n-" + "d" * 40
    app.state.identities = Identities(
        parse_config(
            {
                "server": {"anonymous": "viewer"},
                "token": [{"name": "new", "sha256": sha(new_token), "role": "admin"}],
            }
        )
    )
    with pytest.raises(Refused):  # revoked by the reload
        authenticate(request(app, f"Bearer {TENANT_TOKEN}"), anonymous_ok=False)
    assert authenticate(request(app, f"Bearer {new_token}"), anonymous_ok=False).role is Role.ADMIN
    assert authenticate(request(app), anonymous_ok=True) is ANONYMOUS


# -- the 401 answer ---------------------------------------------------------------------------


def test_every_401_names_the_bearer_scheme():
    # A browser (the dashboard) learns from it that a token would do; made where every error is made.
    refused = refusal(Refused(401, "unauthenticated", "Send a token."))
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    answer = error_response(401, "unauthenticated", "Send a token.", headers={"X-Other": "kept"})
    assert answer.headers["www-authenticate"].startswith("Bearer") and answer.headers["x-other"] == "kept"
    for status in (403, 404, 429):
        assert "www-authenticate" not in error_response(status, "nope", "No.").headers

"""A careless or hostile configuration file: every mistake is a one-line ConfigurationError."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from flux_adapters import EditRequest, FluxClient, errors
from flux_adapters.config import ProviderSettings, load_config
from flux_adapters.prices import PerCall


def configured(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flux-adapters.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "variable",
    [
        "LAOZHANG_API_KEY ",  # a space typed after the name
        " LAOZHANG_API_KEY",
        "LAOZHANG API KEY",
        "LAOZHANG_API_KEY\\t",
        "LAOZHANG_API_KEY\\u00a0",  # a no-break space pasted from a web page
        "LAOZHANG_API_KEY\\n",
        "",
        "A=B",
        "KEY\\u0000",
    ],
)
def test_an_api_key_env_that_no_variable_can_be_named_is_refused(
    tmp_path: Path, variable: str
) -> None:
    # "LAOZHANG_API_KEY " was taken: the variable looked for was never set, so the provider was
    # skipped as having no key, while the variable the user did set sat there.
    path = configured(tmp_path, f'[provider.laozhang]\napi_key_env = "{variable}"\n')
    with pytest.raises(errors.ConfigurationError, match="api_key_env") as caught:
        load_config(path, environ={"FLUX_PROVIDERS": "laozhang"})
    message = str(caught.value)
    assert "\n" not in message
    assert "\r" not in message
    assert "\x00" not in message


def test_a_usable_api_key_env_is_kept(tmp_path: Path) -> None:
    path = configured(tmp_path, '[provider.laozhang]\napi_key_env = "MY_LAOZHANG_KEY"\n')
    config = load_config(path, environ={})
    assert config.providers[0].api_key_env == "MY_LAOZHANG_KEY"


@pytest.mark.parametrize(
    ("section", "shown"),
    [
        ('"laozhang\\r\\nX-Injected: 1"', '[provider."laozhang\\r\\nX-Injected: 1"]'),
        ('"bad name"', '[provider."bad name"]'),
        ('"evil\\u001b[2J"', '[provider."evil\\u001b[2J"]'),
        ('"a\\"b"', '[provider."a\\"b"]'),
        ("nope", "[provider.nope]"),
    ],
)
def test_a_section_name_is_shown_as_the_toml_that_names_it(
    tmp_path: Path, section: str, shown: str
) -> None:
    # The name was put into the message as it was: a CR LF in a quoted TOML key started a new
    # line of the message (and of a log line), an escape sequence reached the terminal.
    path = configured(tmp_path, f'[provider.{section}]\nbase_url = "https://x.example"\n')
    with pytest.raises(errors.ConfigurationError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert shown in message
    assert not any(character in message for character in "\r\n\x1b")


def test_a_dotted_provider_id_is_shown_quoted(tmp_path: Path) -> None:
    # Ids may hold dots; [provider.my.forge] is another table than [provider."my.forge"].
    path = configured(tmp_path, '[provider."my.forge"]\nbase_url = "https://x.example"\n')
    with pytest.raises(errors.ConfigurationError, match=r'\[provider\."my\.forge"\]'):
        load_config(path, environ={})


def test_a_price_for_a_strange_model_key_is_shown_escaped(tmp_path: Path) -> None:
    path = configured(
        tmp_path,
        '[provider.laozhang.prices]\n"flux-2-pro\\r\\nX: 1" = { usd = "free" }\n',
    )
    with pytest.raises(errors.ConfigurationError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert not any(character in message for character in "\r\n")
    assert '"flux-2-pro\\r\\nX: 1"' in message


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("flux-2-typo", "not a FLUX model id (did you mean 'flux-2-pro'?)"),
        ("flux-2-klein-4b", "laozhang does not offer it"),
    ],
)
def test_a_price_no_request_can_use_is_refused_where_the_file_gives_it(
    tmp_path: Path, model: str, says: str
) -> None:
    # A price for a model the provider does not offer was taken and never used; a misspelt
    # model was refused only when the client was built, as "prices=[...]", an argument the
    # user never passed.
    path = configured(
        tmp_path,
        f'providers = ["laozhang"]\n[provider.laozhang.prices]\n"{model}" = {{ usd = 0.1 }}\n',
    )
    with pytest.raises(errors.ConfigurationError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path} [provider.laozhang].prices.{model}")
    assert says in message


@pytest.mark.parametrize(
    ("text", "environ", "says"),
    [
        ('providers = ["laozhang", "LAOZHANG"]\n', {}, "providers lists laozhang more than once"),
        ('providers = [""]\n', {}, "providers: unknown provider ''"),
        ("", {"FLUX_PROVIDERS": "apiyi, nope"}, "$FLUX_PROVIDERS: unknown provider 'nope'"),
        ("", {"FLUX_PROVIDERS": "apiyi,APIYI"}, "$FLUX_PROVIDERS lists apiyi more than once"),
    ],
)
def test_the_provider_list_is_checked_where_it_is_given(
    tmp_path: Path, text: str, environ: dict[str, str], says: str
) -> None:
    path = configured(tmp_path, text)
    with pytest.raises(errors.ConfigurationError) as caught:
        load_config(path, environ=environ)
    assert says in str(caught.value)


# --- ProviderSettings given in code (settings=) --------------------------------------------


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "sk-abcdefabcdefabcdef")
    monkeypatch.setenv("APIYI_API_KEY", "sk-abcdefabcdefabcdef")


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (ProviderSettings(name="laozhang", api_key_env="LAOZHANG_API_KEY\r\nX: y"), "api_key_env"),
        (ProviderSettings(name="laozhang", api_key_env="LAOZHANG_API_KEY "), "api_key_env"),
        (ProviderSettings(name="laozhang", rate_per_minute=-5), "rate_per_minute"),
        (ProviderSettings(name="laozhang", rate_per_minute=float("nan")), "rate_per_minute"),
        (
            ProviderSettings(name="laozhang", prices={"flux-2-pro": PerCall(usd=float("nan"))}),
            "prices",
        ),
        (ProviderSettings(name="laozhang", prices={"flux-2-typo": PerCall(usd=0.1)}), "prices"),
        (ProviderSettings(name="laozhang", priority="1"), "priority"),  # type: ignore[arg-type]
        (ProviderSettings(name="laozhang", priority=True), "priority"),
    ],
    ids=[
        "key-env-line-break",
        "key-env-space",
        "rate-negative",
        "rate-nan",
        "price-nan",
        "price-typo",
        "priority-text",
        "priority-bool",
    ],
)
def test_settings_given_in_code_are_checked_as_the_file_is(
    keys: None, settings: ProviderSettings, says: str
) -> None:
    # Taken as they were: a line break in api_key_env reached the "set ..." message, a
    # negative rate reached the rate limiter, a NaN price the ranking.
    with pytest.raises(errors.ConfigurationError, match=says) as caught:
        FluxClient(providers=["laozhang", "apiyi"], settings={"laozhang": settings})
    assert "\n" not in str(caught.value)


def test_prices_given_in_settings_are_used(keys: None) -> None:
    # They were dropped without a word: only prices= (and from_env) reached the price table.
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(
            200, json={"created": 1, "data": [{"url": "https://cdn.example/a.png"}]}
        )

    cheap = ProviderSettings(name="apiyi", prices={"flux-2-pro": PerCall(usd=0.0001)})
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=["laozhang", "apiyi"],
            routing="cheapest",
            settings={"apiyi": cheap},
            http_client=http,
        )
        result = client.edit(EditRequest(prompt="a robot", model="flux-2-pro"))
    assert result.provider == "apiyi"
    assert result.cost_usd == pytest.approx(0.0001)


@pytest.mark.parametrize(
    ("priorities", "tried"),
    [
        ({"apiyi": 1}, ["apiyi", "laozhang"]),  # a priority before none
        ({"laozhang": 2, "apiyi": 1}, ["apiyi", "laozhang"]),  # lower first
        ({"laozhang": 1, "apiyi": 1}, ["laozhang", "apiyi"]),  # ties as listed
        ({}, ["laozhang", "apiyi"]),  # none: as listed
    ],
)
def test_a_priority_given_in_code_orders_the_providers_as_in_the_file(
    keys: None, priorities: dict[str, int], tried: list[str]
) -> None:
    # ProviderSettings(priority=...) made in code was ignored: the providers list alone
    # decided, though the docstring and the file's [provider.X] priority say otherwise.
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(503, json={"error": {"message": "busy"}})

    settings = {name: ProviderSettings(name=name, priority=p) for name, p in priorities.items()}
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=["laozhang", "apiyi"], settings=settings, http_client=http, max_retries=0
        )
        assert client.providers == tuple(tried)
        with pytest.raises(errors.FluxError):
            client.edit(EditRequest(prompt="a robot", model="flux-2-pro"))
    assert [host.split(".")[-2] for host in hosts] == tried


def test_a_flux_providers_naming_nothing_says_so(tmp_path: Path) -> None:
    # "no providers configured: set FLUX_PROVIDERS", though it was set (to commas and spaces).
    with pytest.raises(errors.ConfigurationError, match=r"\$FLUX_PROVIDERS names no provider"):
        load_config(configured(tmp_path, ""), environ={"FLUX_PROVIDERS": " , ,"})


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2-pw@redis.internal:6379/0",
        "rediss://app:hunter2-pw@r.example/1",
        "redis://r.example/0?password=hunter2-pw",
    ],
)
def test_the_state_urls_password_is_not_in_the_configurations_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # A Config is what a user prints or logs to see what was loaded; the Redis password in its
    # state_url is a credential as the API key is, and stays out of it.
    path = configured(tmp_path, f'providers = ["laozhang"]\nstate_url = "{url}"\n')
    monkeypatch.setenv("FLUX_CONFIG", str(path))
    config = load_config()
    assert config.state_url == url  # kept whole: the state needs it
    assert "hunter2" not in repr(config)
    assert "redis.internal" in repr(config) or "r.example" in repr(config)


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ('routing = ""', "routing must be"),
        ('unknown_price = ""', "unknown_price must be"),
        ('state_fallback = ""', "state_fallback must be"),
        ('state_url = ""', "state_url must be"),
        ('budget_scope = ""', "budget_scope: a state scope"),
    ],
)
def test_an_empty_value_in_the_file_is_refused_not_read_as_the_default(
    tmp_path: Path, line: str, where: str
) -> None:
    # unknown_price = "" (a template whose variable was empty) was read as "allow", routing = ""
    # as "ordered", budget_scope = "" as "client:default": a value given and silently dropped,
    # though budget_period = "" was refused and budget_scope="" in code is too.
    path = configured(tmp_path, f'providers = ["laozhang"]\n{line}\n')
    with pytest.raises(errors.ConfigurationError, match=where) as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("url", ["", "ftp://api.example.com", "https://api.example.com/?a=1"])
def test_a_files_base_url_is_checked_where_the_file_gives_it(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # base_url = "" was taken as no base_url at all: the client sent to the provider's real, paid
    # endpoint, where the operator meant a proxy or the emulator. Any other bad base_url was
    # refused only when the client was built, by a message not naming the file.
    text = f'providers = ["laozhang"]\n[provider.laozhang]\nbase_url = "{url}"\n'
    path = configured(tmp_path, text)
    with pytest.raises(errors.ConfigurationError, match=r"\[provider.laozhang\] base_url") as c:
        load_config(path, environ={})
    assert str(path) in str(c.value)
    monkeypatch.setenv("LAOZHANG_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.delenv("LAOZHANG_BASE_URL", raising=False)
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    with pytest.raises(errors.ConfigurationError, match="base_url"):
        FluxClient.from_env(config=path)


@pytest.mark.parametrize(
    ("file", "environ", "where"),
    [
        ('state_url = "mysql://db/0"', {}, "state_url must be 'local' or start with redis://"),
        ("", {"FLUX_STATE_URL": "redis ://x"}, r"\$FLUX_STATE_URL must be 'local'"),
        ("", {"FLUX_STATE_URL": "localhost:6379"}, r"\$FLUX_STATE_URL must be 'local'"),
    ],
)
def test_a_state_url_that_is_no_state_says_where_it_was_given(
    tmp_path: Path, file: str, environ: dict[str, str], where: str
) -> None:
    # "a state URL must be 'local' or ...": with a file and a variable that may both give one,
    # the message did not say which of them to fix.
    path = configured(tmp_path, f'providers = ["laozhang"]\n{file}\n')
    with pytest.raises(errors.ConfigurationError, match=where) as caught:
        load_config(path, environ=environ)
    if file:
        assert str(path) in str(caught.value)


def test_a_file_saved_with_a_byte_order_mark_says_so(tmp_path: Path) -> None:
    # Notepad's "UTF-8 with BOM": the file read as "not valid TOML (Invalid statement (at line
    # 1, column 1))", pointing at a line that looks right, with nothing to see there.
    path = tmp_path / "flux-adapters.toml"
    path.write_bytes(b'\xef\xbb\xbfproviders = ["laozhang"]\n')
    with pytest.raises(errors.ConfigurationError, match=r"byte order mark \(BOM\)") as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(str(path))


def test_a_providers_own_timeout_wins_over_the_files_top_level_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example in docs/routing.md: timeout = 300, and 240 in [provider.laozhang]. The 300 was
    # passed as timeout=, which wins over a section's: laozhang waited 300 s, its 240 unread.
    monkeypatch.setenv("LAOZHANG_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("AIMLAPI_API_KEY", "sk-test-0123456789abcdef")
    for name in ("FLUX_TIMEOUT", "FLUX_PROVIDERS", "LAOZHANG_BASE_URL", "AIMLAPI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    text = "providers = [{}]\ntimeout = 300\n[provider.laozhang]\ntimeout = 240\n"
    first = configured(tmp_path, text.format('"laozhang", "aimlapi"'))
    with FluxClient.from_env(config=first) as client:
        assert client.provider == "laozhang"
        assert client.timeout.read == 240.0
    with httpx.Client(timeout=7) as http:
        # aimlapi first: no timeout of its own, so the file's 300, not the http_client's 7.
        second = tmp_path / "second.toml"
        second.write_text(text.format('"aimlapi", "laozhang"'), encoding="utf-8")
        with FluxClient.from_env(config=second, http_client=http) as client:
            assert client.provider == "aimlapi"
            assert client.timeout.read == 300.0
    monkeypatch.setenv("FLUX_TIMEOUT", "45")  # the environment overrides the whole file
    with FluxClient.from_env(config=first) as client:
        assert client.timeout.read == 45.0


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ('budget_period = "day"\n', "budget_period has no effect without budget_usd"),
        ('budget_scope = "team:a"\n', "budget_scope has no effect without budget_usd"),
        ('unknown_price = "refuse"\n', "unknown_price has no effect without max_cost_usd"),
        (
            "[provider.aimlapi]\ntimeout = 30\n",
            "[provider.aimlapi] has no effect without aimlapi in providers",
        ),
    ],
)
def test_a_setting_nothing_will_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, warned: str
) -> None:
    # Each was taken and silently unused: a day's budget period with no budget to count, a
    # failover provider configured in its section but missing from the list.
    path = configured(tmp_path, 'providers = ["laozhang"]\n' + text)
    with caplog.at_level("WARNING", logger="flux_adapters"):
        load_config(path, environ={})
    [record] = caplog.records
    assert record.getMessage().startswith(f"{path} {warned}")


def test_settings_that_work_together_are_not_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        'providers = ["laozhang"]\nbudget_usd = 5\nbudget_period = "day"\nbudget_scope = "t"\n'
        'unknown_price = "refuse"\n[provider.laozhang]\ntimeout = 30\n[provider.aimlapi]\n'
    )
    path = configured(tmp_path, text)
    with caplog.at_level("WARNING", logger="flux_adapters"):
        load_config(path, environ={"FLUX_MAX_COST_USD": "0.1", "FLUX_PROVIDERS": "laozhang"})
        load_config(path, environ={"FLUX_MAX_COST_USD": "0.1", "FLUX_PROVIDERS": "aimlapi"})
    assert caplog.records == []


@pytest.mark.parametrize(
    ("argv", "environ", "where"),
    [
        (["keys", "--state", "localhost:6379", "list"], {}, "--state must be"),
        (["keys", "list"], {"FLUX_STATE_URL": "localhost:6379"}, r"\$FLUX_STATE_URL must be"),
        (["serve", "--state", "localhost:6379", "--port", "0"], {}, "--state must be"),
        (["batch", "{jobs}", "--state", "localhost:6379", "-o", "{out}"], {}, "--state must be"),
    ],
)
def test_the_command_line_says_which_state_url_is_no_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    environ: dict[str, str],
    where: str,
) -> None:
    # "a state URL must be 'local' or ...": from --state, $FLUX_STATE_URL or the file, it did
    # not say which one to fix.
    import io

    from flux_adapters.cli import main

    monkeypatch.chdir(tmp_path)  # no flux-adapters.toml here
    for name in ("FLUX_CONFIG", "FLUX_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang")
    monkeypatch.setenv("LAOZHANG_API_KEY", "sk-test-0123456789abcdef")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "p", "size": "64x64"}\n', encoding="utf-8")
    argv = [arg.format(jobs=jobs, out=tmp_path / "out") for arg in argv]
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, out=out, err=err) == 5
    assert re.search(where, err.getvalue()), err.getvalue()


@pytest.mark.parametrize(
    "key",
    [
        "sk-live-0123456789abcdefABCDEF",
        "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0:0123456789abcdef",
        # Letters and digits only: a valid name to a shell, taken as one, and printed back.
        "Xk9fQ2mZr7Lp4Tn8Wb3Vc6Yd1Hs5Jg0A",
        "0123456789abcdef0123456789abcdef",  # 32 hex digits
        "ABCDEF0123456789ABCDEF0123456789ABCDEF01",
    ],
)
def test_a_key_given_as_api_key_env_is_refused_without_being_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    # api_key_env = "sk-..." (the setting's name invites the key itself) was taken as the name
    # of a variable: "no API key for laozhang: set sk-live-..." printed the key, and so did the
    # warning "laozhang skipped: no API key (set sk-live-...)" when another provider had one.
    text = f'providers = ["laozhang", "aimlapi"]\n[provider.laozhang]\napi_key_env = "{key}"\n'
    path = configured(tmp_path, text)
    monkeypatch.setenv("AIMLAPI_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    with caplog.at_level("DEBUG"), pytest.raises(errors.ConfigurationError) as caught:
        FluxClient.from_env(config=path)
    assert "api_key_env must be the name of an environment variable" in str(caught.value)
    assert key[:8] not in str(caught.value)
    assert key[:8] not in caplog.text
    with pytest.raises(errors.ConfigurationError) as in_code:
        FluxClient(
            providers=["laozhang"],
            settings={"laozhang": ProviderSettings(name="laozhang", api_key_env=key)},
        )
    assert "api_key_env must be the name" in str(in_code.value)
    assert key[:8] not in str(in_code.value)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer sk-live-0123456789abcdefABCDEF",
        "LAOZHANG_API_KEY=sk-live-0123456789abcdef",  # a line of a .env file
        "sk-live-0123456789abcdefABCDEF\n",
        "Xk9fQ2mZr7Lp4Tn8Wb3Vc6Yd1Hs5Jg0A ",
    ],
)
def test_a_key_with_a_space_or_equals_sign_in_api_key_env_is_not_shown(value: str) -> None:
    # Refused for its space or '=', and then printed whole: "..., not 'Bearer sk-live-...'".
    settings = ProviderSettings(name="laozhang", api_key_env=value)
    with pytest.raises(errors.ConfigurationError, match="api_key_env must be") as caught:
        FluxClient(providers=["laozhang"], settings={"laozhang": settings})
    assert "not shown" in str(caught.value)
    assert "sk-live" not in str(caught.value)
    assert "Xk9f" not in str(caught.value)


def test_a_name_with_a_space_after_it_in_api_key_env_is_shown() -> None:
    settings = ProviderSettings(name="laozhang", api_key_env="LAOZHANG_API_KEY ")
    with pytest.raises(errors.ConfigurationError, match="not 'LAOZHANG_API_KEY '"):
        FluxClient(providers=["laozhang"], settings={"laozhang": settings})


@pytest.mark.parametrize(
    "name",
    [
        "LAOZHANG_API_KEY",
        "MY_COMPANY_LAOZHANG_API_KEY_FOR_PRODUCTION_2026",  # long, with underscores
        "laozhangKey2",  # mixed case and digits, but short
        "LAOZHANGAPIKEYFORTHEPRODUCTIONTEAM",  # long, one case, no digit
    ],
)
def test_a_name_that_could_be_a_variables_is_kept_as_api_key_env(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(name, raising=False)
    settings = ProviderSettings(name="laozhang", api_key_env=name)
    with pytest.raises(errors.ConfigurationError, match=f"no API key for laozhang: set {name}$"):
        FluxClient(providers=["laozhang"], settings={"laozhang": settings})


@pytest.mark.parametrize("variable", ["FLUX_PROVIDERS", "FLUX_TIMEOUT", "FLUX_ROUTING"])
def test_a_key_pasted_into_another_variable_is_not_printed_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # FLUX_PROVIDERS=$LAOZHANG_API_KEY (a slip in a deploy script): "unknown provider
    # 'Zx9a...'" printed the key on stderr and in --json, into the CI log.
    import io
    import json

    from flux_adapters.cli import main

    key = "Zx9aQ7bWm3Lp0Rt5Yv8Nc2Kd"  # no shape a scrubber would know: only its value tells
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang")
    monkeypatch.setenv("LAOZHANG_API_KEY", key)
    monkeypatch.setenv(variable, key)
    out, err = io.StringIO(), io.StringIO()
    assert main(["edit", "a cat", "--json"], out=out, err=err) == 5
    assert variable in err.getvalue()
    assert key[:8] not in err.getvalue() + out.getvalue()
    assert "[redacted]" in json.loads(out.getvalue())["error"]["message"]


@pytest.mark.parametrize("variable", ["FLUX_TIMEOUT", "FLUX_MAX_COST_USD", "FLUX_JOB_DEADLINE"])
def test_a_huge_number_variable_is_refused_in_a_short_message(variable: str) -> None:
    # A file's contents pasted into $FLUX_TIMEOUT came back whole in the error: 100 kB.
    with pytest.raises(errors.ConfigurationError, match=f"{variable} must be a number") as caught:
        load_config(environ={"FLUX_PROVIDERS": "laozhang", variable: "x" * 100_000})
    assert len(str(caught.value)) < 300


def test_a_very_long_config_path_is_shortened_to_its_end_in_the_error(tmp_path: Path) -> None:
    # The whole $FLUX_CONFIG came back: a path of 5,000 characters, a message of 5,000.
    deep = tmp_path / ("d" * 250) / ("e" * 250) / "flux-adapters.toml"
    deep.parent.mkdir(parents=True)
    deep.write_text('providers = ["laozhang"]\nrouting = "fastest"\n')
    with pytest.raises(errors.ConfigurationError) as caught:
        load_config(environ={"FLUX_CONFIG": str(deep)})
    message = str(caught.value)
    assert len(message) < 500
    assert message.startswith("...ddd")
    assert "/flux-adapters.toml: " in message  # the file's name, where the mistake is
    assert "fastest" in message
    with pytest.raises(errors.ConfigurationError, match=r"^\.\.\.d+/x\.toml: ") as missing:
        load_config(environ={"FLUX_CONFIG": "/" + "d" * 5000 + "/x.toml"})
    assert len(str(missing.value)) < 500


@pytest.mark.parametrize("rate", ["1e-300", "1e-9", "0.0001"])
def test_a_rate_no_one_means_is_refused_in_the_file_and_in_code(tmp_path: Path, rate: str) -> None:
    # rate_per_minute = 1e-300 was taken: the key's first call held the next for 10^300
    # seconds, and the skip said so in a 300-digit number.
    text = f'providers = ["laozhang"]\n[provider.laozhang]\nrate_per_minute = {rate}\n'
    with pytest.raises(errors.ConfigurationError, match="at least one a day") as caught:
        load_config(configured(tmp_path, text), environ={})
    assert "rate_per_minute" in str(caught.value)
    with pytest.raises(errors.ConfigurationError, match="at least one a day"):
        FluxClient(
            providers=["laozhang"],
            settings={"laozhang": ProviderSettings(name="laozhang", rate_per_minute=float(rate))},
        )


def test_a_rate_of_one_a_day_is_taken(tmp_path: Path) -> None:
    text = 'providers = ["laozhang"]\n[provider.laozhang]\nrate_per_minute = 0.000695\n'
    assert load_config(configured(tmp_path, text), environ={}).providers[0].rate_per_minute

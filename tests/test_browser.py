"""The neuron page in real headless Chromium against a real uvicorn server.

Set GLUSCOPE_SCREENSHOT=1 to also save docs/neuron-page.png (the README shows it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from gluscope.schema import HOOKS

pytestmark = [pytest.mark.system, pytest.mark.browser, pytest.mark.xdist_group("browser")]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "neuron-page.png"


@pytest.fixture(scope="module")
def driver():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): run `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gluscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1500", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_page_load_timeout(30)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _no_alert(d) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text


def test_neuron_page_in_chromium(live_server, driver, script_list):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d, wait = driver, WebDriverWait(driver, 15)
    model = httpx.get(f"{live_server}/api/models").json()["models"][0]["id"]
    layer, neuron, slug, hook = script_list
    d.get(f"{live_server}/models/{model}/neurons/{layer}/{neuron}")
    assert f"{layer}.{neuron}" in d.find_element(By.TAG_NAME, "h1").text
    assert not d.find_elements(By.CSS_SELECTOR, ".snippet .t")  # examples load only when opened

    # Open one example list: htmx fetches it.
    section = d.find_element(By.ID, f"ex-{slug}-{hook}")
    section.find_element(By.TAG_NAME, "summary").click()
    wait.until(lambda _: section.find_elements(By.CSS_SELECTOR, ".snippet .t"))
    tokens = section.find_elements(By.CSS_SELECTOR, ".snippet .t")
    expected = httpx.get(f"{live_server}/api/models/{model}/neurons/{layer}/{neuron}/examples",
                         params={"quadrant": slug, "hook": hook}).json()
    assert len(tokens) == sum(len(ex["tokens"]) for ex in expected["examples"])

    # The planted token is shown as text, and nothing ran.
    assert any(t.text == "<script>" for t in tokens)
    _no_alert(d)
    assert d.execute_script("return [...document.scripts].every(s => s.src.includes('/-/static/'))")

    # Hover the token of interest of the first example: the tooltip shows all four values.
    first = section.find_element(By.CSS_SELECTOR, ".ex .snippet .t.focus")
    ActionChains(d).move_to_element(first).perform()
    tip = d.find_element(By.ID, "tip")
    wait.until(EC.visibility_of(tip))
    rows = {r.get_attribute("data-hook"): r.text.split()[-1] for r in tip.find_elements(By.CSS_SELECTOR, ".tip-row")}
    ex0 = expected["examples"][0]
    i = ex0["position"] - ex0["window_start"]
    assert list(rows) == list(HOOKS)
    for h in HOOKS:
        assert float(rows[h]) == pytest.approx(ex0["activations"][h][i], rel=1e-3, abs=1e-6), h
    # Keyboard focus shows it too.
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).perform()
    wait.until(EC.invisibility_of_element(tip))
    d.execute_script("arguments[0].focus()", tokens[1])
    wait.until(EC.visibility_of(tip))

    # The selector recolours the tokens by another value.
    before = first.value_of_css_property("background-color")
    other = "hook_pre" if hook != "hook_pre" else "hook_pre_linear"
    Select(section.find_element(By.CSS_SELECTOR, "select.colour-by")).select_by_value(other)
    wait.until(lambda _: first.value_of_css_property("background-color") != before)

    # "full text" loads the decoded text.
    section.find_element(By.CSS_SELECTOR, "details.fulltext summary").click()
    wait.until(lambda _: section.find_elements(By.CSS_SELECTOR, ".text-full .decoded"))

    if os.environ.get("GLUSCOPE_SCREENSHOT"):
        # Close the weights and the other quadrants' lists out of the picture: header, Figure 1, one open list.
        d.execute_script("document.querySelector('section.weights').remove();"
                         "document.querySelectorAll('section.quadrant').forEach(s => {"
                         "  if (!s.contains(arguments[0])) s.remove(); });", section)
        d.set_window_size(1280, 1900)
        d.execute_script("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        ActionChains(d).move_to_element(first).perform()
        wait.until(EC.visibility_of(tip))
        d.save_screenshot(str(SCREENSHOT))

    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    # Follow "next neuron".
    d.find_element(By.ID, "next-neuron").click()
    wait.until(EC.url_matches(r"/neurons/\d+/\d+$"))
    nxt = (layer, neuron + 1) if neuron + 1 < 96 else (layer + 1, 0)
    assert d.current_url.endswith(f"/neurons/{nxt[0]}/{nxt[1]}")
    assert f"{nxt[0]}.{nxt[1]}" in d.find_element(By.TAG_NAME, "h1").text
    _no_alert(d)


def test_fragment_tokens_match_the_server_rendered_page(live_server, driver, script_list):
    """gluscope.js expands the fragment's compact snippets into exactly what the no-JavaScript page renders:
    each token's tooltip values, position, quadrant, classes and colour."""
    import html
    import re

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d, wait = driver, WebDriverWait(driver, 15)
    model = httpx.get(f"{live_server}/api/models").json()["models"][0]["id"]
    layer, neuron, _, _ = script_list
    d.get(f"{live_server}/models/{model}/neurons/{layer}/{neuron}")
    for slug, hook in (("pp", "hook_post"), ("nn", "act"), ("pn", "hook_pre")):
        section = d.find_element(By.ID, f"ex-{slug}-{hook}")
        section.find_element(By.TAG_NAME, "summary").click()
        wait.until(lambda _: section.find_elements(By.CSS_SELECTOR, ".snippet .t"))
        shown = d.execute_script(
            "return [...arguments[0].querySelectorAll('.snippet .t')].map(t => "
            "[t.className, t.dataset.head, t.dataset.v, getComputedStyle(t).backgroundColor])", section)
        page = httpx.get(f"{live_server}/models/{model}/neurons/{layer}/{neuron}/examples",
                         params={"quadrant": slug, "hook": hook}).text
        rendered = re.findall(r'<span class="(t[^"]*)" tabindex="0" title="([^"]*)"(?: style="background:([^"]*)")?>',
                              page)
        assert len(shown) == len(rendered) > 0
        for (cls, head, values, background), (page_cls, title, page_background) in zip(shown, rendered):
            page_head, *lines = html.unescape(title).split("\n")
            assert sorted(cls.split()) == sorted(page_cls.split())
            assert head == page_head
            assert values.split(",") == [line.split(" ")[1] for line in lines]
            alpha = float(page_background.rsplit(",", 1)[1].rstrip(")")) if page_background else 0.0
            got = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", background)
            got_alpha = float(got.group(4) or 1) if got and background != "rgba(0, 0, 0, 0)" else 0.0
            assert got_alpha == pytest.approx(alpha, abs=0.005)  # Chromium keeps alpha in 8 bits
            if alpha:
                assert page_background.startswith(f"rgba({got.group(1)},{got.group(2)},{got.group(3)},")


def test_tooltip_numbers_are_formatted_as_on_the_page(live_server, driver):
    """gluscope.js's fmt is Python's "%.4g" (render.format_many) for every finite float16 value, whose exact
    ties at the fourth digit a naive toPrecision rounds the other way, and for random float32 values."""
    import numpy as np

    from gluscope.server.render import format_many

    driver.get(f"{live_server}/")
    every_f16 = np.arange(-(2 ** 15), 2 ** 15, dtype=np.int32).astype(np.int16).view(np.float16)
    rng = np.random.default_rng(0)
    f32 = (rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 12, 20000)).astype(np.float32)
    values = [float(v) for v in np.concatenate([every_f16[np.isfinite(every_f16)].astype(np.float32), f32])]
    shown = driver.execute_script("return arguments[0].map(window.GLUScope.fmt)", values)
    expected = format_many(values)
    wrong = [(v, s, e) for v, s, e in zip(values, shown, expected) if s != e]
    assert not wrong, wrong[:10]


def test_search_a_token_and_follow_a_result(live_server, driver):
    """Type a token into a model page's search box, pick a suggestion (htmx), then follow a result to its neuron."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    d, wait = driver, WebDriverWait(driver, 15)
    model = httpx.get(f"{live_server}/api/models").json()["models"][0]["id"]
    d.get(f"{live_server}/models/{model}")
    box = d.find_element(By.CSS_SELECTOR, "form.search-box input[name=token]")
    box.send_keys("the")
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, ".search-box .suggestions a"))
    expected = httpx.get(f"{live_server}/api/models/{model}/search/suggest", params={"token": "the"}).json()
    links = d.find_elements(By.CSS_SELECTOR, ".search-box .suggestions a")
    assert len(links) == len(expected["suggestions"]) > 0
    links[0].click()
    wait.until(EC.url_contains("/search?token_id="))
    token_id = expected["suggestions"][0]["token_id"]
    results = httpx.get(f"{live_server}/api/models/{model}/search/tokens", params={"token_id": token_id}).json()
    hits = d.find_elements(By.CSS_SELECTOR, "table.search-hits a.hit")
    assert [h.text for h in hits] == [f"{r['layer']}.{r['neuron']}" for r in results["results"]]
    first = results["results"][0]
    hits[0].click()
    wait.until(EC.url_matches(rf"/neurons/{first['layer']}/{first['neuron']}$"))
    assert f"{first['layer']}.{first['neuron']}" in d.find_element(By.TAG_NAME, "h1").text
    # The neuron page loads its related neurons, each a link.
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, ".related a.ref"))
    # Without JavaScript the box is a plain form: submitting the text searches it loosely.
    d.get(f"{live_server}/models/{model}/layers/0")
    box = d.find_element(By.CSS_SELECTOR, "form.search-box input[name=token]")
    box.send_keys("THE")
    d.find_element(By.CSS_SELECTOR, "form.search-box button").click()
    wait.until(EC.url_contains("/search?token=THE"))
    assert d.find_elements(By.CSS_SELECTOR, "table.search-hits a.hit")
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_filter_form_then_compare_in_chromium(live_server, driver):
    """Fill the filter form, submit it, and open the first results in the comparison: its columns load,
    and switching the list (htmx) swaps the columns to the other list's examples."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d, wait = driver, WebDriverWait(driver, 15)
    model = httpx.get(f"{live_server}/api/models").json()["models"][0]["id"]
    d.get(f"{live_server}/models/{model}")
    d.find_element(By.ID, "filter-link").click()
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "form.filter-form"))
    d.find_element(By.NAME, "layers").send_keys("1-1")
    d.find_element(By.ID, "min_freq_nn").send_keys("0.05")
    d.find_element(By.ID, "max_cos_in_out").send_keys("0.5")
    Select(d.find_element(By.NAME, "sort")).select_by_value("absmax_nn")
    Select(d.find_element(By.NAME, "order")).select_by_value("desc")
    d.find_element(By.ID, "filter-submit").click()
    wait.until(lambda _: "min_freq_nn=0.05" in d.current_url)
    assert "min_freq_pp" not in d.current_url  # empty bounds stay out of the shared URL
    expected = httpx.get(f"{live_server}/api/models/{model}/neurons", params={
        "layers": "1-1", "min_freq_nn": 0.05, "max_cos_in_out": 0.5, "sort": "absmax_nn"}).json()
    assert expected["total"] >= 2
    links = [a.text for a in d.find_elements(By.CSS_SELECTOR, "table.filter-results td:first-child a")]
    assert links == [f"{n['layer']}.{n['neuron']}" for n in expected["neurons"]]

    d.find_element(By.ID, "compare-first").click()
    wait.until(lambda _: "/compare?" in d.current_url)
    first = expected["neurons"][:4]
    columns = d.find_elements(By.CSS_SELECTOR, "#compare-lists .compare-col")
    assert [c.get_attribute("id") for c in columns] == [f"col-{n['layer']}-{n['neuron']}" for n in first]
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#compare-lists .snippet .t.focus"))  # expanded by gluscope.js

    # Another list: htmx swaps the columns and pushes the URL.
    Select(d.find_element(By.CSS_SELECTOR, ".list-choice select[name=quadrant]")).select_by_value("nn")
    wait.until(lambda _: "quadrant=nn" in d.current_url)
    wait.until(lambda _: d.find_element(By.CSS_SELECTOR, ".list-choice select[name=quadrant]")
               .get_attribute("value") == "nn")
    shown = d.find_elements(By.CSS_SELECTOR, f"#col-{first[0]['layer']}-{first[0]['neuron']} li.ex")
    api = httpx.get(f"{live_server}/api/models/{model}/neurons/{first[0]['layer']}/{first[0]['neuron']}/examples",
                    params={"quadrant": "nn", "hook": "hook_post"}).json()
    assert len(shown) == len(api["examples"])
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    _no_alert(d)


def test_histograms_switch_values_and_show_an_intervals_examples(live_server, driver):
    """The lazy distributions section: switch the histograms between values, click an interval of a hook_post
    histogram and read its examples (loaded in place), then open that list's random tab."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d, wait = driver, WebDriverWait(driver, 15)
    model = httpx.get(f"{live_server}/api/models").json()["models"][0]["id"]
    layer, neuron = 1, 42
    api = f"{live_server}/api/models/{model}/neurons/{layer}/{neuron}"
    page = f"{live_server}/models/{model}/neurons/{layer}/{neuron}"
    d.get(page)
    def switched_on() -> list[str]:  # read in one script: htmx replaces the elements under our feet
        return d.execute_script("return [...document.querySelectorAll('.dist-switch a.on')].map(a => a.textContent)")

    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#hist-pp svg a.interval"))
    assert switched_on() == ["hook_post"]
    assert len(d.find_elements(By.CSS_SELECTOR, ".dist svg.hist")) == 4
    assert len(d.find_elements(By.CSS_SELECTOR, ".dist svg.density")) == 1

    # Switch to x_gate: the histograms are redrawn for hook_pre, without the intervals of |hook_post|.
    d.find_element(By.LINK_TEXT, "hook_pre").click()
    wait.until(lambda _: switched_on() == ["hook_pre"])
    assert not d.find_elements(By.CSS_SELECTOR, ".dist svg a.interval") and d.current_url == page
    d.find_element(By.LINK_TEXT, "hook_post").click()
    wait.until(lambda _: switched_on() == ["hook_post"] and d.find_elements(By.CSS_SELECTOR, "#hist-pp svg a.interval"))

    # Click the first interval of gate+_in+ that holds examples: they load under the plots.
    for slug in ("pp", "pn", "np", "nn"):
        lists = {i: httpx.get(f"{api}/examples", params={"quadrant": slug, "hook": "hook_post", "kind": "interval",
                                                         "interval": i}).json()
                 for i in range(4)}
        chosen = next((i for i, body in lists.items() if body["examples"]), None)
        if chosen is not None:
            break
    assert chosen is not None
    expected = lists[chosen]["examples"]
    hit = d.find_element(By.CSS_SELECTOR, f'#hist-{slug} svg a.interval[data-interval="{chosen}"] rect.band-key')
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", hit)
    hit.click()
    box = "#dist-examples .examples[data-kind='interval']"
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, f"{box} li.ex")) == len(expected))
    assert d.current_url == page  # loaded in place, no navigation
    shown = d.find_elements(By.CSS_SELECTOR, f"{box} li.ex .snippet")
    for snippet, ex in zip(shown, expected):
        focus = snippet.find_element(By.CSS_SELECTOR, ".t.focus")
        assert focus.get_attribute("data-head").startswith(f"position {ex['position']} ")
    group = d.find_element(By.CSS_SELECTOR, f"{box} li.ex-group").text
    lo, hi = expected[0]["interval"]
    assert group.startswith("|hook_post| in [") and ("∞" in group) == (hi is None)

    # The list's tabs: random examples of the same quadrant replace it.
    d.find_element(By.CSS_SELECTOR, f"{box} .ex-tabs a.tab:nth-of-type(2)").click()
    randoms = httpx.get(f"{api}/examples", params={"quadrant": slug, "hook": "hook_post", "kind": "random"}).json()
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#dist-examples .examples[data-kind='random'] li.ex"))
               == len(randoms["examples"]))
    _no_alert(d)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_the_probe_on_a_neuron_page_with_hostile_texts(live_probe_server, driver):
    """The neuron page's probe sections load, run on typed texts (the planted XSS corpus among them), show
    each text as escaped tokens, and a switch-off answer; no alert, no injected element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .test_probe_http import HOSTILE

    d = driver
    model = httpx.get(f"{live_probe_server}/api/models").json()["models"][0]["id"]
    d.get(f"{live_probe_server}/models/{model}/neurons/1/3")
    wait = WebDriverWait(d, 20)
    form = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".probe-activations form"))
    for text in [*HOSTILE, "The cat sat."]:
        box = form.find_element(By.NAME, "text")
        box.clear()
        box.send_keys(text)
        want = httpx.get(f"{live_probe_server}/api/models/{model}/probe/activations",
                         params={"text": text, "neurons": "1.3"}).json()
        form.find_element(By.TAG_NAME, "button").click()
        # Until htmx has swapped this text's answer in: its tokens, as many as the JSON's.
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('.probe-activations .snippet .t').length") == len(want["tokens"])
            and d.find_element(By.NAME, "text").get_attribute("value") == text)
        assert not d.find_elements(By.CSS_SELECTOR, "main img, main svg[onload], main script")
        _no_alert(d)
        form = d.find_element(By.CSS_SELECTOR, ".probe-activations form")
    ablate = d.find_element(By.CSS_SELECTOR, ".probe-ablate form")
    ablate.find_element(By.NAME, "text").send_keys(HOSTILE[0])
    ablate.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".probe-ablate .ablate-table tbody tr"))
    _no_alert(d)

"""Drives the RaftMQ web console in headless Chromium (Playwright, with
Debian's chromium): the cluster page, a typed form surviving its refresh,
navigation away from a loading page, a topic create, a leadership transfer,
and screenshots of the main pages. Prints one JSON line with what it saw.

    drive.py URL OUT_DIR
"""

import json
import re
import sys
import time

from playwright.sync_api import sync_playwright

url, out = sys.argv[1], sys.argv[2]
TOPIC = "console-topic"


def leader_of(page):
    """The leader node the cluster page shows, or None."""
    text = page.inner_text(".leader-name")
    m = re.search(r"leader: node (\d+)", text)
    return int(m.group(1)) if m else None


def wait(what, f, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("dialog", lambda d: d.accept())  # every confirmation: yes

    page.goto(url + "/#cluster")
    page.wait_for_selector(".leader-name")
    before = wait("a leader on the cluster page", lambda: leader_of(page))
    nodes = page.eval_on_selector_all("tr[data-node]", "rows => rows.map(r => Number(r.dataset.node))")
    # Let the live chart collect a few points.
    time.sleep(4.5)
    page.screenshot(path=f"{out}/cluster.png", full_page=True)
    # What an operator types into the add-node form outlives the refresh.
    page.fill("form.add-node input[name=address]", "10.9.9.9:8081")
    time.sleep(4.5)
    form_kept = page.input_value("form.add-node input[name=address]")
    page.fill("form.add-node input[name=address]", "")
    # Leaving the cluster page while it loads: its refresh must not start
    # and draw over the page navigated to.
    page.click("#nav-groups")
    page.click("#nav-cluster")
    page.click("#nav-topics")
    page.wait_for_selector("#topic-form")
    time.sleep(4.5)
    stayed = page.query_selector("#topic-form") is not None and page.query_selector(".leader-name") is None

    page.click("#nav-topics")
    page.wait_for_selector("#topic-form")
    page.fill("#topic-name", TOPIC)
    page.fill("#topic-queues", "4")
    page.click("#topic-create")
    page.wait_for_selector(f'tr[data-topic="{TOPIC}"]', timeout=15000)
    queues = page.inner_text(f'tr[data-topic="{TOPIC}"] td:nth-child(3)')
    page.screenshot(path=f"{out}/topics.png", full_page=True)

    page.click("#nav-groups")
    page.wait_for_selector("#group-pick")
    page.screenshot(path=f"{out}/groups.png", full_page=True)
    page.click("#nav-messages")
    page.wait_for_selector("#find")
    page.screenshot(path=f"{out}/messages.png", full_page=True)

    page.click("#nav-cluster")
    page.wait_for_selector("button.transfer")
    target = next(n for n in nodes if n != before)
    page.click(f'button.transfer[data-node="{target}"]')
    after = wait("the page to show a new leader", lambda: (leader_of(page) or before) != before and leader_of(page))
    page.screenshot(path=f"{out}/cluster-after-transfer.png", full_page=True)
    browser.close()

print(json.dumps({"leader_before": before, "leader_after": after, "asked": target, "topic_queues": queues, "nodes": nodes,
                  "form_kept": form_kept, "navigation_stayed": stayed}))

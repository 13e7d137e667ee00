// The sample spec of qgjob's original README:
//   qgjob submit --org-id=qualgent --app-version-id=xyz123 --test=tests/onboarding.spec.js
// An AppWright test: `device` drives the app installed from the job's build on the emulator,
// USB device or BrowserStack session the agent picked.
const { test, expect } = require("appwright");

test("onboarding: a new user reaches the home screen", async ({ device }) => {
  await device.getByText("Skip").tap();
  await expect(device.getByText("Search Wikipedia", { exact: true })).toBeVisible();
});

test("onboarding: search finds an article", async ({ device }) => {
  await device.getByText("Skip").tap();
  const search = device.getByText("Search Wikipedia", { exact: true });
  await search.tap();
  await search.fill("playwright");
  await expect(device.getByText("Microsoft")).toBeVisible();
});

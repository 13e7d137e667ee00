// Onboarding: a new user skips the intro and lands on the home screen.
import { test, expect } from "appwright";

test("new user can skip onboarding", async ({ device }) => {
  await device.getByText("Skip").tap();
  await expect(device.getByText("Search Wikipedia", { exact: true })).toBeVisible();
});

test("onboarding explains languages", async ({ device }) => {
  await expect(device.getByText("The Free Encyclopedia")).toBeVisible();
  await device.getByText("Continue").tap();
  await expect(device.getByText("New ways to explore")).toBeVisible();
});

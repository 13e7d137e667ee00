// Search: typing a query shows matching articles.
import { test, expect } from "appwright";

test.describe("search", () => {
  test("finds an article", async ({ device }) => {
    await device.getByText("Skip").tap();
    const search = device.getByText("Search Wikipedia", { exact: true });
    await search.tap();
    await search.fill("playwright");
    await expect(device.getByText("Microsoft")).toBeVisible();
  });
});

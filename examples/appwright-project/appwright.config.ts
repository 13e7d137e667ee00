// qgjob example: AppWright configuration with one project per qgjob target.
//
// `qgjob agent` runs `npx appwright test <files> --project <target> --reporter=json` in a
// copy of the test bundle, with the device and build in the environment:
//   QGJOB_BUILD_PATH    local APK (emulator/device) or bs:// app URL (browserstack)
//   QGJOB_DEVICE_SERIAL adb serial of the device the agent picked
// so the same config works on a laptop (the fallbacks below) and on the agents.
import { defineConfig, Platform } from "appwright";

const buildPath = process.env.QGJOB_BUILD_PATH ?? "builds/app-release.apk";

export default defineConfig({
  testDir: "./tests",
  // Per-test timeout; qgjob's per-job --timeout bounds the whole run.
  timeout: 5 * 60 * 1000,
  projects: [
    {
      name: "emulator",
      use: {
        platform: Platform.ANDROID,
        device: { provider: "emulator" },
        buildPath,
      },
    },
    {
      name: "device",
      use: {
        platform: Platform.ANDROID,
        device: {
          provider: "local-device",
          udid: process.env.QGJOB_DEVICE_SERIAL,
        },
        buildPath,
      },
    },
    {
      name: "browserstack",
      use: {
        platform: Platform.ANDROID,
        // BrowserStack needs a device name and OS version; credentials come from
        // BROWSERSTACK_USERNAME / BROWSERSTACK_ACCESS_KEY on the agent.
        device: {
          provider: "browserstack",
          name: "Google Pixel 8",
          osVersion: "14.0",
        },
        buildPath,
      },
    },
  ],
});

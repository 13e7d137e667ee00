//! Real devices for `qgjob agent`: the AppWright command runner, Android (adb) devices and
//! BrowserStack sessions.
